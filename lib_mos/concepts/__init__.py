"""Concepts (ED-LoRA and the LoRAs people own): the in-memory form (`concept`), files in every
format we read and write (`files`), the Lora-folder library (`library`), layer-wise prompt binding
(`binding`) and random concepts for tests and benchmarks (`synthetic`)."""
