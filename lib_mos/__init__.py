"""Mix-of-Show for the AUTOMATIC1111 WebUI: the host-independent core.

Subpackages, one per part of the paper and its plumbing, importing one another one way
(models <- concepts <- regional <- fusion, training <- toyworld, cli):
- `models`: model families (SD1, SDXL), builders, checkpoint IO, the attn2 processor mechanism.
- `concepts`: concepts and LoRAs in memory and in files, the concept library, layer-wise binding.
- `regional`: region specs and masks, regional attention, region LoRAs.
- `fusion`: gradient fusion, its solver, report, child process and checkpoint.
- `training`: the ED-LoRA trainer and its data.
- `toyworld`: the small learned world the evidence comes from.
- `cli`: `python -m lib_mos`.
- `files`: atomic writes.
Nothing here imports the host (`modules.*`); `scripts/` is the glue.
"""

__version__ = "0.1.0"
