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
   fused into the trained base, composed regionally into a picture a person can judge, the same
   regions with nothing merged (each concept's LoRA in its own region), and the committed
   fidelity table.
`make demo` runs every step at a small size (QUICK: about 1.5 CPU-minutes, one torch thread);
`--full` (`make demo-full`) runs them at the demo's earlier, longer settings (FULL). Each step
prints its wall and CPU seconds, and the demo ends with a summary: every file written and what to
look at in it. Later features add their steps here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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

NOISE = "noise (random weights); "  # every tiny-SD1 picture's hint starts so: nothing in it to recognise


@dataclass(frozen=True)
class DemoSize:
    """How much work each step does. Every step runs in both sizes; QUICK only does less of it
    (fewer steps, seeds and samples), so `make demo` stays a few minutes on a 2-core CPU."""

    size: int  # pixels of the tiny-SD1 pictures and of the fusions' spatial stage
    steps: int  # Euler steps of those pictures and of the spatial stage's sampling
    train_steps: int  # the <disc1> <disc2> concept's training steps
    spatial_seeds: int  # noise seeds per concept in the fusions' spatial stage
    check_steps: int  # the fusion report's picture check ("what it draws")
    check_seeds: int
    toy_samples: int  # toy-world compositions sampled (rows of its picture)
    toy_spatial_steps: int  # the toy-world fusion's spatial stage at 128 px
    toy_check_steps: int


# QUICK: about 1.5 CPU-minutes with one torch thread; FULL: the demo's settings before the quick one
QUICK = DemoSize(size=64, steps=8, train_steps=16, spatial_seeds=2, check_steps=4, check_seeds=1, toy_samples=2,
                 toy_spatial_steps=8, toy_check_steps=4)
FULL = DemoSize(size=64, steps=12, train_steps=40, spatial_seeds=4, check_steps=8, check_seeds=2, toy_samples=4,
                toy_spatial_steps=20, toy_check_steps=8)
DEMO_THREADS = 1  # tiny models gain nothing from more; on a busy 2-core machine extra threads only spin


class Wrote(Protocol):
    """How a step reports a file: `what` is printed now, `look` (what a person should look at in
    it) in the closing summary; None: the file is only named there."""

    def __call__(self, path: Path, what: str, look: str | None = None) -> None: ...


class Record:
    """The files the demo writes, with what to look at in each, and each step's wall and CPU
    seconds: printed as it goes and summarised at the end, so a user knows where to look and a
    slow step shows."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.files: dict[Path, str | None] = {}
        self.steps: list[tuple[str, float, float]] = []

    def __call__(self, path: Path, what: str, look: str | None = None) -> None:
        self.files[Path(path)] = look
        print(f"{what}: {path}")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step; CPU seconds are the whole process's (every torch thread)."""
        print(f"--- {name}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.steps.append((name, wall, cpu))
        print(f"--- {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

    def summary(self) -> str:
        """What was written, one line each: the path under `out` and what to look at."""
        lines = [f"what to look at (all under {self.out}/):"]
        for path, look in self.files.items():
            name = path.relative_to(self.out) if path.is_relative_to(self.out) else path
            lines.append(f"  {name}: {look}" if look else f"  {name}")
        return "\n".join(lines)


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


def fusion_settings(demo: DemoSize, seed: int) -> fusion.FusionSettings:
    """The fusion the demo runs on the tiny SD1 model, at the demo's size."""
    return fusion.FusionSettings(spatial_steps=demo.steps, spatial_size=demo.size, spatial_seeds=demo.spatial_seeds,
                                 check_steps=demo.check_steps, check_seeds=demo.check_seeds, seed=seed)


# The mixed set's LoRAs change every attention linear, as a trainer's file does, but the other kinds
# (feed-forward, proj_in/out, resnet 3x3 convs, text-encoder MLP) in a few blocks only, so the demo
# stays fast (`lib_mos.concepts.synthetic.lora_layer_names` lists all of them): the first and last transformer
# blocks and resnets for the LoCon, the middle block's for the LoHa, two text-encoder layers each.
_LOCON_LAYERS = ("input_blocks.1.", "output_blocks.11.", "text_model.encoder.layers.10.", "text_model.encoder.layers.11.")
_LOHA_LAYERS = ("middle_block.", "text_model.encoder.layers.0.", "text_model.encoder.layers.1.")
LOCON_TAGS = {"10_ohwx corgi": {"ohwx corgi": 15, "dog": 11, "grass": 4}}  # kohya: {"<repeats>_<folder>": {tag: count}}
LOHA_TAGS = {"8_sks vase": {"sks vase": 12, "flowers": 5, "table": 3}}


def mixed_set(model: sd1.SD1Model, base: Path, specs: list[fused_checkpoint.ConceptSpec], concept_dir: Path, out: Path,
              *, seed: int, demo: DemoSize, wrote: Wrote) -> list[str]:
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
                    "trainer's layout, ss_tag_frequency metadata, no tokens",
              f"a {'kohya LoCon' if kind == 'locon' else 'LyCORIS LoHa'} as its trainer saves it (random weights): "
              "no tokens, trigger words only in ss_tag_frequency")
        read = read_concept(path, name=folder)
        print(f"  trigger word {read.prompt_words!r}: {read.trigger_source}")
        ours = write_concept(read, concept_dir / f"{folder}.safetensors", overwrite=True)
        wrote(ours, "  converted to our concept format (trigger words in its metadata)",
              f"that {'LoCon' if kind == 'locon' else 'LoHa'} converted: trigger words {read.prompt_words!r} in "
              "its metadata")
        loras.append(fused_checkpoint.ConceptSpec(str(ours)))

    path, result = fused_checkpoint.fuse_checkpoint(base, [*specs, *loras], out / "fused-mixed.safetensors",
                                                    fusion_settings(demo, seed), dtype=torch.float32, overwrite=True)
    print("gradient fusion report, mixed set (2 ED-LoRA concepts with tokens, a LoCon and a LoHa with trigger words):")
    print("  " + fusion_report.format_report(result.report, result.warnings).replace("\n", "\n  "))
    wrote(path, "fused checkpoint, mixed set (" + ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()) + ")",
          "cat1, dog1 (tokens), ohwx-corgi and sks-vase (trigger words) in one checkpoint; the mixed-set report "
          "above: all four in every stage")

    fused = sd1.load_checkpoint(path)
    concepts = fused_checkpoint.read_fused_concepts(path)
    binder = binding.PromptBinder(fused, concepts)
    words = {c.name: c.prompt_words for c in concepts}
    prompt = f"a photo of <cat1> <cat2> and {words['ohwx-corgi']} next to a {words['sks-vase']}"
    latents = sampling.sample_euler(fused, binder.encode([prompt]), binding.encode_prompts(fused, ["blurry"]),
                                    seeds=[seed], height=demo.size, width=demo.size, steps=demo.steps, cfg_scale=7.5)
    image_path = out / "fused-mixed.png"
    sampling.latents_to_images(latents)[0].save(image_path)
    wrote(image_path, f"sampled {prompt!r} with the mixed checkpoint (tokens bound, trigger words as plain text)",
          NOISE + "the mixed checkpoint, tokens and trigger words in one prompt")
    return [c.name for c in concepts]


def trained_concept(model: sd1.SD1Model, out: Path, *, seed: int, steps: int, wrote: Wrote) -> Path:
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
        wrote(folder / f"disc{k}.png", "training picture", f"a red disc on a plain background ({k + 1} of 4)")
        wrote(folder / f"disc{k}.txt", "  its caption (the class word 'ball' marks the concept)",
              "its caption: 'a red ball, plain ground'")
    settings = training.TrainSettings(tokens=("<disc1>", "<disc2>"), class_word="ball", steps=steps, batch_size=2,
                                      resolution=64, lr_unet=2e-3, lr_text=1e-4, lr_embedding=1e-2,
                                      templates="object", views_per_image=4, seed=seed)
    losses: list[float] = []
    path = out / "concepts" / "disc.safetensors"
    t0 = time.perf_counter()
    training.train(model, settings, read_training_folder(folder, class_word="ball"), path, encoder=vae.PreviewEncoder(),
                   overwrite=True, progress=lambda p: losses.append(p.loss))
    n = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    wrote(path, f"trained concept <disc1> <disc2>: {settings.steps} steps in {time.perf_counter() - t0:.1f} s, "
                f"loss {first:.3f} -> {last:.3f} (mean of the first and last {n} steps)",
          f"<disc1> <disc2> trained on those pictures for {settings.steps} steps: loss {first:.3f} -> {last:.3f}, "
          "lower at the end")
    return path


def run_demo(out: Path, *, seed: int = 0, full: bool = False, threads: int | None = DEMO_THREADS) -> list[Path]:
    """Run every step (QUICK, or FULL with `full`), print each file as it is written, each step's
    time, and a closing summary of what to look at. `threads`: torch's intra-op threads (None:
    torch's default). Returns the files written."""
    demo = FULL if full else QUICK
    if threads is not None:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    wrote = Record(out)
    t0, c0 = time.perf_counter(), time.process_time()
    size, steps = demo.size, demo.steps
    print(f"demo ({'full' if full else 'quick; --full runs every step longer'}): pictures {size}x{size}, {steps} Euler "
          f"steps, {demo.train_steps} training steps, {demo.toy_samples} toy-world samples, "
          f"{torch.get_num_threads()} torch thread(s)")

    with wrote.step("1. tiny SD1 model, txt2img, training a concept"):
        model = sd1.build_tiny_sd1(seed=seed)
        base = sd1.save_checkpoint(model, out / "tiny-sd1.safetensors", overwrite=True)
        wrote(base, f"tiny SD1 model (16 attn2 layers, context {model.config.context_dim}), host checkpoint layout",
              "the random-weight tiny SD1 base every step starts from, in the host's checkpoint layout")

        prompts = ["a photo of a cat", "a photo of a dog"]
        cond = binding.encode_prompts(model, prompts)
        uncond = binding.encode_prompts(model, ["blurry"] * len(prompts))
        latents = sampling.sample_euler(model, cond, uncond, seeds=[seed, seed + 1], height=size, width=size,
                                        steps=steps, cfg_scale=7.5)
        for prompt, image in zip(prompts, sampling.latents_to_images(latents)):
            path = out / f"txt2img-{prompt.replace(' ', '-')}.png"
            image.save(path)
            wrote(path, f"sampled {prompt!r} ({steps} Euler steps, CFG 7.5, {size}x{size})",
                  NOISE + f"plain txt2img of {prompt!r}, its own seed")

        concept_dir = out / "concepts"
        concept_dir.mkdir(exist_ok=True)
        disc = trained_concept(model, out, seed=seed, steps=demo.train_steps, wrote=wrote)

    with wrote.step("2. the authors' ED-LoRA files converted"):
        specs = []
        for k, (tokens, spelling) in enumerate(((("<cat1>", "<cat2>"), "main"),
                                                (("<dog1>", "<dog2>"), "research_branch"))):
            concept = synthetic.random_concept(model, tokens, seed=seed + 10 + k)
            pth = concept_dir / f"{concept.name}-edlora-{spelling}.pth"
            torch.save(synthetic.authors_params(concept, spelling), pth)
            wrote(pth, f"concept {' '.join(tokens)} in the authors' ED-LoRA layout ({spelling} spelling)",
                  f"the authors' ED-LoRA .pth layout, {spelling} key spelling (random weights)")
            ours = write_concept(read_concept(pth, name=concept.name), concept_dir / f"{concept.name}.safetensors",
                                 overwrite=True)
            wrote(ours, "  converted to our concept format (also a kohya LoRA for the WebUI)",
                  f"that .pth converted: tokens {' '.join(tokens)}; the WebUI's Lora tab lists it")
            specs.append(fused_checkpoint.ConceptSpec(str(ours)))

    with wrote.step("3. fusion of cat1, dog1 and the trained disc"):
        fused_path = out / "fused-cat-dog-disc.safetensors"
        path, result = fused_checkpoint.fuse_checkpoint(base, [*specs, fused_checkpoint.ConceptSpec(str(disc))],
                                                        fused_path, fusion_settings(demo, seed), dtype=torch.float32,
                                                        overwrite=True)
        print("gradient fusion report (relative output error per concept and stage; lower is better):")
        print("  " + fusion_report.format_report(result.report).replace("\n", "\n  "))
        wrote(path, "fused checkpoint (" + ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()) + ")",
              "cat1, dog1 and disc in one checkpoint; its report above: 'fused' below 'averaged' and 'stacked' "
              "means fusion kept that concept better than merging the LoRAs")

    with wrote.step("4-5. sampling with the fused checkpoint, two regions"):
        fused = sd1.load_checkpoint(path)
        binder = binding.PromptBinder(fused, fused_checkpoint.read_fused_concepts(path))
        prompt = "a photo of <cat1> <cat2> and <dog1> <dog2>"
        latents = sampling.sample_euler(fused, binder.encode([prompt]), binding.encode_prompts(fused, ["blurry"]),
                                        seeds=[seed], height=size, width=size, steps=steps, cfg_scale=7.5)
        image_path = out / "fused-cat-and-dog.png"
        sampling.latents_to_images(latents)[0].save(image_path)
        wrote(image_path, f"sampled {prompt!r} with the fused checkpoint (layer-wise binding)",
              NOISE + "the fused checkpoint, <cat1> <cat2> and <dog1> <dog2> bound in one prompt")
        wrote(regional_image(fused, binder, out / "regional-cat-left-dog-right.png", seed=seed, size=size,
                             steps=steps),
              "two regions: <cat1> <cat2> on the left half, <dog1> <dog2> on the right (regional cross-attention)",
              NOISE + "the left half sampled under the <cat1> <cat2> prompt, the right under <dog1> <dog2>")

    with wrote.step("6. mixed set: kohya LoCon and LyCORIS LoHa with the ED-LoRAs"):
        mixed = mixed_set(model, base, specs, concept_dir, out, seed=seed, demo=demo, wrote=wrote)
        print(f"mixed set fused: {', '.join(mixed)}")

    if toy_weights.available():
        from lib_mos.toyworld import demo as toy_demo

        with wrote.step("7. toy world: three concepts fused and composed"):
            toy_demo.run(out, wrote, seed=seed, samples=demo.toy_samples, spatial_steps=demo.toy_spatial_steps,
                         check_steps=demo.toy_check_steps)
    else:
        print(f"toy world skipped: no weights under {toy_weights.WEIGHTS} (docs/toyworld.md says how to train them)")

    print()
    print(wrote.summary())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print("time per step (wall, CPU): " + "; ".join(f"{n.split('.')[0]} {w:.0f} s, {c:.0f} s" for n, w, c in wrote.steps))
    print(f"demo finished in {wall:.1f} s ({cpu:.1f} s CPU); wrote {len(wrote.files)} files under {out}/"
          + ("" if full else "; `make demo-full` (python -m lib_mos demo --full) runs every step longer"))
    return list(wrote.files)
