"""The Linear and Conv2d layers of each family's UNet, by ldm's module names, shipped as data.

Reading a LoRA file maps its keys onto these names (`lib_mos.concepts.files`). They used to be
read off an ldm UNet built on the meta device, but Forge has no `ldm`, so the names ship with the
extension (`unet_layers.json`); `from_ldm` rebuilds them where ldm is importable, and a test keeps
the two equal. Regenerate with `python -m lib_mos.models.unet_layers` after changing a topology.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from lib_mos.models.family import FAMILIES, SD1, ModelFamily

DATA = Path(__file__).with_name("unet_layers.json")


@functools.cache
def unet_layers(family: ModelFamily) -> dict[str, bool]:
    """Layer name -> whether it is a Conv2d (else a Linear), in the UNet's module order."""
    entry = json.loads(DATA.read_text())[family.name]
    return {name: bool(conv) for name, conv in entry}


def from_ldm(family: ModelFamily) -> dict[str, bool]:
    """The same, read off ldm's UNet of the family on the meta device (needs `ldm`)."""
    from torch import nn

    from lib_mos.models import sd1, sdxl

    unet = sd1.build_unet(sd1.TINY_SD1, device="meta") if family is SD1 else sdxl.build_unet(sdxl.TINY_SDXL, device="meta")
    return {name: isinstance(m, nn.Conv2d) for name, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


if __name__ == "__main__":
    table = {name: [[layer, int(conv)] for layer, conv in from_ldm(family).items()] for name, family in FAMILIES.items()}
    DATA.write_text(json.dumps(table, separators=(",", ":")) + "\n")
    print(f"wrote {DATA} ({', '.join(f'{k}: {len(v)} layers' for k, v in table.items())})")
