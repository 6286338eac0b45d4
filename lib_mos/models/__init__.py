"""What a model is: each family's topology (`family`, `sd1`, `sdxl`), its tokenizer, VAE, the attn2
processor mechanism every feature hooks through (`attention`), and a plain sampler (`sampling`)."""
