"""A test double of the subset of AUTOMATIC1111 stable-diffusion-webui v1.10.1 that the extension uses.

Module names, call signatures and behaviour follow the real host (see ../README.md); the double
runs a real denoising loop over the tiny random-weight SD1 model from `lib_mos.models.sd1`.
"""
