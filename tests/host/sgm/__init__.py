"""A small stand-in for Stability's `sgm` package (generative-models at the commit the host pins),
which is not installable here. It holds only what v1.10.1 reaches when it runs SDXL: the
DiffusionEngine with its OpenAIWrapper, the GeneralConditioner and its embedders
(FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2 around an OpenCLIP-structured text tower,
ConcatTimestepEmbedderND), the attention classes (CrossAttention, BasicTransformerBlock,
SpatialTransformer), the eps/v scalings and the legacy DDPM discretization. Each module's
docstring names what it imitates; behaviour was written from that source, the code is the double's.
"""
