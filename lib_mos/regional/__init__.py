"""Regionally controllable sampling: region specs and masks (`regions`), regional cross-attention
(`attention`) and each region's own LoRAs in one UNet pass (`loras`)."""
