"""`make demo`: the product's main job end to end on the tiny random-weight SD1 model.

Writes under the output folder and prints every file it wrote. Later features add their steps
here (concept conversion, fusion, regional sampling).
"""

from __future__ import annotations

import time
from pathlib import Path

from lib_mos import binding, sampling, sd1


def run_demo(out: Path, *, seed: int = 0, size: int = 64, steps: int = 12) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    t0 = time.perf_counter()
    model = sd1.build_tiny_sd1(seed=seed)
    ckpt = sd1.save_checkpoint(model, out / "tiny-sd1.safetensors", overwrite=True)
    written.append(Path(ckpt))
    print(f"built the tiny SD1 model (16 attn2 layers, context {model.config.context_dim}) "
          f"and saved it in the host's checkpoint layout: {ckpt}")

    prompts = ["a photo of a cat", "a photo of a dog"]
    cond = binding.encode_prompts(model, prompts)
    uncond = binding.encode_prompts(model, ["blurry"] * len(prompts))
    latents = sampling.sample_euler(model, cond, uncond, seeds=[seed, seed + 1], height=size, width=size,
                                    steps=steps, cfg_scale=7.5)
    for prompt, image in zip(prompts, sampling.latents_to_images(latents)):
        path = out / f"txt2img-{prompt.replace(' ', '-')}.png"
        image.save(path)
        written.append(path)
        print(f"sampled {prompt!r} ({steps} Euler steps, CFG 7.5, {size}x{size}): {path}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; wrote {len(written)} files under {out}/")
    return written
