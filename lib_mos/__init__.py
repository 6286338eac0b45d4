"""Mix-of-Show for the AUTOMATIC1111 WebUI: the host-independent core.

Modules, one per idea of the paper and its plumbing:
- `sd1`: SD1 topology (names, builders, the tiny test model, checkpoint IO).
- `clip_tokenizer`: the SD1.5 CLIP tokenizer built offline.
- `binding`: prompts -> UNet conditioning (layer-wise concept binding builds on it).
- `sampling`: a seeded Euler sampler with classifier-free guidance, used outside the host.
- `files`: atomic writes.
Nothing here imports the host (`modules.*`); `scripts/` is the glue.
"""

__version__ = "0.1.0"
