"""A small world we can generate, learn and measure: the evidence that concepts keep their identity.

No real SD weights can be downloaded where this project is tested, so every other image it makes
is noise. This package closes that gap with a world of 32x32 pictures of simple objects
(`world`), a fixed patch codec standing in for the VAE (`codec`), probe classifiers that read the
attributes back (`probe`), a tiny SD1-topology text-to-image model trained on it (`base`), and
novel concepts tuned with the product's own ED-LoRA trainer (`novel`). `bench/fidelity.py` and
`make demo` use them. Run `python -m lib_mos.toyworld --help` for the commands.
"""
