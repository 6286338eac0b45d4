"""`make demo`: the product's main job end to end on the tiny random-weight SD1 model.

1. build the tiny SD1 model and save it in the host's checkpoint layout;
   train a small concept (<disc1> <disc2>) on a few generated pictures with the ED-LoRA trainer;
2. write two concepts in the authors' ED-LoRA `.pth` layout (both key spellings) and convert
   them to our `.safetensors` concept format;
3. fuse them and the trained concept into one checkpoint (gradient fusion) and print the fusion report;
4. sample with the fused checkpoint, binding both concepts' tokens in one prompt;
5. render a two-region image: a global prompt, one concept on each half (regional attention);
6. a mixed set: write a kohya LoCon (LoRA on the text encoder's attention and MLP and the UNet's
   transformer blocks, LoCon on resnet 3x3 convs) with kohya's `ss_tag_frequency` metadata and a
   LyCORIS LoHa, both as trainers save them (no tokens: trigger words, read from the tag
   frequencies), convert them, fuse them with the two ED-LoRA concepts and print that report;
   sample with the mixed checkpoint, tokens and trigger words in one prompt.
7. the toy world (lib_mos.toyworld), when its committed weights are present: three novel concepts
   fused into the trained base, composed regionally into a picture a person can judge, and the
   committed fidelity table.
Every file written is printed. Later features add their steps here.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lib_mos.concepts import binding, synthetic
from lib_mos.concepts.files import read_concept, write_concept
from lib_mos.fusion import checkpoint as fused_checkpoint
from lib_mos.fusion import pipeline as fusion
from lib_mos.fusion import report as fusion_report
from lib_mos.models import sampling, sd1, vae
from lib_mos.regional.attention import RegionalContext
from lib_mos.regional.regions import Region, RegionSpec, layer_masks
from lib_mos.toyworld import weights as toy_weights
from lib_mos.training import trainer as training
from lib_mos.training.data import read_training_folder


def regional_image(model: sd1.SD1Model, binder: binding.PromptBinder, path: Path, *, seed: int, size: int,
                   steps: int) -> Path:
    """A global prompt everywhere and one concept per region, as the txt2img script does in the WebUI."""
    spec = RegionSpec(regions=(Region("a photo of <cat1> <cat2>", box=(0.0, 0.0, 1.0, 0.5), units="fraction"),
                               Region("a photo of <dog1> <dog2>", box=(0.0, 0.5, 1.0, 1.0), units="fraction")))
    cond = binder.encode(["a photo of a cat and a dog, side by side"])  # [1, L, 77, D]
    uncond = binder.encode(["blurry"])
    regions = binder.encode([r.prompt for r in spec.regions])  # [K, L, 77, D]
    negatives = binder.encode([r.negative for r in spec.regions])
    # UNet rows are [cond, uncond]: region prompts on the cond row, region negatives on the uncond row
    region_rows = torch.stack([regions, negatives]).transpose(1, 2)  # [2, L, K, 77, D]
    processor = RegionalContext()
    processor.set_rows(region_rows, layer_masks(spec, size, size))
    latents = sampling.sample_euler(model, cond, uncond, seeds=[seed], height=size, width=size, steps=steps,
                                    cfg_scale=7.5, processor=processor)
    sampling.latents_to_images(latents)[0].save(path)
    return path


# The mixed set's LoRAs change every attention linear, as a trainer's file does, but the other kinds
# (feed-forward, proj_in/out, resnet 3x3 convs, text-encoder MLP) in a few blocks only, so the demo
# stays fast (`lib_mos.concepts.synthetic.lora_layer_names` lists all of them): the first and last transformer
# blocks and resnets for the LoCon, the middle block's for the LoHa, two text-encoder layers each.
_LOCON_LAYERS = ("input_blocks.1.", "output_blocks.11.", "text_model.encoder.layers.10.", "text_model.encoder.layers.11.")
_LOHA_LAYERS = ("middle_block.", "text_model.encoder.layers.0.", "text_model.encoder.layers.1.")
LOCON_TAGS = {"10_ohwx corgi": {"ohwx corgi": 15, "dog": 11, "grass": 4}}  # kohya: {"<repeats>_<folder>": {tag: count}}
LOHA_TAGS = {"8_sks vase": {"sks vase": 12, "flowers": 5, "table": 3}}


def mixed_set(model: sd1.SD1Model, base: Path, specs: list[fused_checkpoint.ConceptSpec], concept_dir: Path, out: Path,
              *, seed: int, size: int, steps: int, wrote) -> list[str]:
    """Write a kohya LoCon and a LyCORIS LoHa as trainers save them, read them back as trigger-word
    concepts (trigger words from `ss_tag_frequency`), convert them, fuse them with the ED-LoRA
    concepts in `specs`, print the report and sample with the fused checkpoint. Returns the fused
    concepts' names."""
    loras = []
    for kind, tags, layers, what in (
            ("locon", LOCON_TAGS, _LOCON_LAYERS, "kohya LoCon: LoRA on text-encoder attention + MLP and UNet "
                                                 "attention, feed-forward, proj_in/out; LoCon on resnet 3x3 convs"),
            ("loha", LOHA_TAGS, _LOHA_LAYERS, "LyCORIS LoHa on the same kinds of layers")):
        unet_names, text_names = synthetic.lora_layer_names(model, kind)
        tag_counts = next(iter(tags.values()))
        concept = synthetic.random_lora_concept(
            model, kind, triggers=(max(tag_counts, key=tag_counts.get),), seed=seed + 20 + len(loras),
            unet_names=[n for n in unet_names if n.startswith(layers) or ".attn" in n],
            text_names=[n for n in text_names if n.startswith(layers) or ".self_attn." in n])
        folder = next(iter(tags)).split("_", 1)[1].replace(" ", "-")
        path = synthetic.write_lora_file(concept, concept_dir / f"{folder}-{kind}.safetensors", tags=tags)
        wrote(path, f"{what} ({len(concept.unet_lora)} UNet + {len(concept.text_lora)} text-encoder layers), "
                    "trainer's layout, ss_tag_frequency metadata, no tokens")
        read = read_concept(path, name=folder)
        print(f"  trigger word {read.prompt_words!r}: {read.trigger_source}")
        ours = write_concept(read, concept_dir / f"{folder}.safetensors", overwrite=True)
        wrote(ours, "  converted to our concept format (trigger words in its metadata)")
        loras.append(fused_checkpoint.ConceptSpec(str(ours)))

    settings = fusion.FusionSettings(spatial_steps=steps, spatial_size=size, seed=seed)
    path, result = fused_checkpoint.fuse_checkpoint(base, [*specs, *loras], out / "fused-mixed.safetensors", settings,
                                                    dtype=torch.float32, overwrite=True)
    print("gradient fusion report, mixed set (2 ED-LoRA concepts with tokens, a LoCon and a LoHa with trigger words):")
    print("  " + fusion_report.format_report(result.report, result.warnings).replace("\n", "\n  "))
    wrote(path, "fused checkpoint, mixed set (" + ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()) + ")")

    fused = sd1.load_checkpoint(path)
    concepts = fused_checkpoint.read_fused_concepts(path)
    binder = binding.PromptBinder(fused, concepts)
    words = {c.name: c.prompt_words for c in concepts}
    prompt = f"a photo of <cat1> <cat2> and {words['ohwx-corgi']} next to a {words['sks-vase']}"
    latents = sampling.sample_euler(fused, binder.encode([prompt]), binding.encode_prompts(fused, ["blurry"]),
                                    seeds=[seed], height=size, width=size, steps=steps, cfg_scale=7.5)
    image_path = out / "fused-mixed.png"
    sampling.latents_to_images(latents)[0].save(image_path)
    wrote(image_path, f"sampled {prompt!r} with the mixed checkpoint (tokens bound, trigger words as plain text)")
    return [c.name for c in concepts]


def trained_concept(model: sd1.SD1Model, out: Path, *, seed: int, wrote) -> Path:
    """A red-disc concept trained on four generated pictures (tiny model: seconds)."""
    from PIL import Image, ImageDraw

    folder = out / "training-images"
    folder.mkdir(exist_ok=True)
    for k in range(4):
        box = (8 + 4 * k, 10, 44 + 4 * k, 50)
        img = Image.new("RGB", (64, 64), (20 + 50 * k, 40, 200 - 40 * k))
        ImageDraw.Draw(img).ellipse(box, fill=(220, 30, 30))
        img.save(folder / f"disc{k}.png")
        (folder / f"disc{k}.txt").write_text("a red ball, plain ground")
        wrote(folder / f"disc{k}.png", "training picture")
        wrote(folder / f"disc{k}.txt", "  its caption (the class word 'ball' marks the concept)")
    settings = training.TrainSettings(tokens=("<disc1>", "<disc2>"), class_word="ball", steps=40, batch_size=2,
                                      resolution=64, lr_unet=2e-3, lr_text=1e-4, lr_embedding=1e-2,
                                      templates="object", views_per_image=4, seed=seed)
    losses: list[float] = []
    path = out / "concepts" / "disc.safetensors"
    t0 = time.perf_counter()
    training.train(model, settings, read_training_folder(folder, class_word="ball"), path, encoder=vae.PreviewEncoder(),
                   overwrite=True, progress=lambda p: losses.append(p.loss))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    wrote(path, f"trained concept <disc1> <disc2>: {settings.steps} steps in {time.perf_counter() - t0:.1f} s, "
                f"loss {first:.3f} -> {last:.3f} (mean of the first and last 10 steps)")
    return path


def run_demo(out: Path, *, seed: int = 0, size: int = 64, steps: int = 12) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    t0 = time.perf_counter()

    def wrote(path: Path, what: str) -> None:
        written.append(Path(path))
        print(f"{what}: {path}")

    model = sd1.build_tiny_sd1(seed=seed)
    base = sd1.save_checkpoint(model, out / "tiny-sd1.safetensors", overwrite=True)
    wrote(base, f"tiny SD1 model (16 attn2 layers, context {model.config.context_dim}), host checkpoint layout")

    prompts = ["a photo of a cat", "a photo of a dog"]
    cond = binding.encode_prompts(model, prompts)
    uncond = binding.encode_prompts(model, ["blurry"] * len(prompts))
    latents = sampling.sample_euler(model, cond, uncond, seeds=[seed, seed + 1], height=size, width=size,
                                    steps=steps, cfg_scale=7.5)
    for prompt, image in zip(prompts, sampling.latents_to_images(latents)):
        path = out / f"txt2img-{prompt.replace(' ', '-')}.png"
        image.save(path)
        wrote(path, f"sampled {prompt!r} ({steps} Euler steps, CFG 7.5, {size}x{size})")

    concept_dir = out / "concepts"
    concept_dir.mkdir(exist_ok=True)
    disc = trained_concept(model, out, seed=seed, wrote=wrote)
    specs = []
    for k, (tokens, spelling) in enumerate(((("<cat1>", "<cat2>"), "main"), (("<dog1>", "<dog2>"), "research_branch"))):
        concept = synthetic.random_concept(model, tokens, seed=seed + 10 + k)
        pth = concept_dir / f"{concept.name}-edlora-{spelling}.pth"
        torch.save(synthetic.authors_params(concept, spelling), pth)
        wrote(pth, f"concept {' '.join(tokens)} in the authors' ED-LoRA layout ({spelling} spelling)")
        ours = write_concept(read_concept(pth, name=concept.name), concept_dir / f"{concept.name}.safetensors", overwrite=True)
        wrote(ours, "  converted to our concept format (also a kohya LoRA for the WebUI)")
        specs.append(fused_checkpoint.ConceptSpec(str(ours)))

    fused_path = out / "fused-cat-dog-disc.safetensors"
    settings = fusion.FusionSettings(spatial_steps=steps, spatial_size=size, seed=seed)
    path, result = fused_checkpoint.fuse_checkpoint(base, [*specs, fused_checkpoint.ConceptSpec(str(disc))], fused_path, settings, dtype=torch.float32, overwrite=True)
    print("gradient fusion report (relative output error per concept and stage; lower is better):")
    print("  " + fusion_report.format_report(result.report).replace("\n", "\n  "))
    wrote(path, "fused checkpoint (" + ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()) + ")")

    fused = sd1.load_checkpoint(path)
    binder = binding.PromptBinder(fused, fused_checkpoint.read_fused_concepts(path))
    prompt = "a photo of <cat1> <cat2> and <dog1> <dog2>"
    latents = sampling.sample_euler(fused, binder.encode([prompt]), binding.encode_prompts(fused, ["blurry"]),
                                    seeds=[seed], height=size, width=size, steps=steps, cfg_scale=7.5)
    image_path = out / "fused-cat-and-dog.png"
    sampling.latents_to_images(latents)[0].save(image_path)
    wrote(image_path, f"sampled {prompt!r} with the fused checkpoint (layer-wise binding)")

    wrote(regional_image(fused, binder, out / "regional-cat-left-dog-right.png", seed=seed, size=size, steps=steps),
          "two regions: <cat1> <cat2> on the left half, <dog1> <dog2> on the right (regional cross-attention)")

    mixed = mixed_set(model, base, specs, concept_dir, out, seed=seed, size=size, steps=steps, wrote=wrote)
    print(f"mixed set fused: {', '.join(mixed)}")

    if toy_weights.available():
        from lib_mos.toyworld import demo as toy_demo

        toy_demo.run(out, wrote, seed=seed)
    else:
        print(f"toy world skipped: no weights under {toy_weights.WEIGHTS} (docs/toyworld.md says how to train them)")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; wrote {len(written)} files under {out}/")
    return written
