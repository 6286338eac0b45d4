"""Command line: `python -m lib_mos <command>`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lib_mos.cli import train as training_cli
from lib_mos.cli_help import HelpWithDefaults

LDM_REPOSITORY = Path("repositories") / "stable-diffusion-stability-ai"
PRIVATE_LDM = Path(__file__).absolute().parent.parent.parent / ".mos-ldm"
"""Where install.py puts `ldm` in a host without it (Forge), for this process only."""


def webui_candidates() -> list[Path]:
    """Where a WebUI install may be: $MOS_WEBUI, the install whose venv runs this Python
    (`<webui>/venv/bin/python`), and the install this extension sits in (`<webui>/extensions/<ext>`,
    through a symlink too, hence $PWD)."""
    here = Path(__file__).absolute().parent.parent
    found = [Path(os.environ["MOS_WEBUI"])] if os.environ.get("MOS_WEBUI") else []
    found.append(Path(sys.executable).absolute().parent.parent.parent)
    found += [here.parent.parent, here.resolve().parent.parent]
    if os.environ.get("PWD"):
        found.append(Path(os.environ["PWD"]).parent.parent)
    return found


def use_webui_packages() -> Path | None:
    """Make `ldm` importable when this runs with the WebUI's own Python: the WebUI keeps ldm in
    `repositories/stable-diffusion-stability-ai` and puts it on sys.path only while it runs; in
    Forge, which has none, install.py put it in the extension's `.mos-ldm`. Returns the folder
    added, if any."""
    import importlib.util

    if importlib.util.find_spec("ldm") is not None:
        return None
    for repo in [webui / LDM_REPOSITORY for webui in webui_candidates()] + [PRIVATE_LDM]:
        if (repo / "ldm" / "modules").is_dir():
            sys.path.insert(0, str(repo))
            return repo
    return None


def missing_ldm() -> str | None:
    """Why the model-building commands cannot run with this Python, or None: they build the UNet with
    the `ldm` package, which A1111's WebUI keeps in `repositories/` and Forge does not have."""
    import importlib.util

    if importlib.util.find_spec("ldm") is not None:
        return None
    return (f"builds the model with the `ldm` package, which this Python cannot import ({sys.executable}; looked "
            f"for {LDM_REPOSITORY} in {', '.join(dict.fromkeys(str(p) for p in webui_candidates())) or 'no WebUI folder'}"
            f", and in {PRIVATE_LDM}). "
            "In Forge, restart it once so that the extension's install.py puts `ldm` into the extension's "
            f"{PRIVATE_LDM.name} folder; elsewhere run it with an AUTOMATIC1111 WebUI's Python (set "
            "MOS_WEBUI=<webui folder> if the extension is not inside it), or in this extension's own environment "
            "(`make setup`). `convert` runs with any of them.")


def main(argv: list[str] | None = None) -> int:
    use_webui_packages()
    parser = argparse.ArgumentParser(prog="python -m lib_mos", description="Mix-of-Show tools outside the WebUI.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job end to end on the embedded tiny model (quick: a few "
                                       "minutes on 2 CPU cores; --full or `make demo-full`: every step longer)",
                          description="Train, convert, fuse, sample, compose regions and the toy world's picture, "
                                      "each at a small size (`make demo`, a few minutes on 2 CPU cores); ends with "
                                      "every file written and what to look at in it. --full (`make demo-full`) "
                                      "runs every step longer.",
                          formatter_class=HelpWithDefaults)
    demo.add_argument("--out", type=Path, default=Path("outputs"), help="folder for what the demo writes")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--full", action="store_true",
                      help="run every step at the longer settings: more training, fusion and sampling steps, more "
                           "toy-world samples (`make demo-full`)")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (0: torch's default); the tiny models gain nothing from more")
    convert = sub.add_parser(
        "convert", formatter_class=HelpWithDefaults,
        help="convert an ED-LoRA .pth, or any LoRA the WebUI applies (with an embedding, or by its trigger words), "
             "into a Mix-of-Show concept .safetensors",
    )
    convert.add_argument("input", type=Path, metavar="IN",
                         help="the authors' .pth, our .safetensors, or a LoRA (kohya LoRA/LoCon, LoHa, LoKr, full "
                              "diff, DoRA)")
    convert.add_argument("output", type=Path, metavar="OUT", help="the .safetensors file to write")
    convert.add_argument("--embedding", type=Path, help="textual-inversion embedding that goes with a kohya LoRA")
    convert.add_argument("--trigger", metavar="WORDS",
                         help='trigger words of a LoRA without an embedding ("ohwx man"; commas separate several); '
                              "default: the activation text of its .json, else its most frequent training tag")
    convert.add_argument("--name", help="concept name (default: the file stem; names the tokens of an --embedding)")
    convert.add_argument("--family", choices=("auto", "sd1", "sdxl"), default="auto",
                         help="the model family the LoRA is for (default: what the file says, else its keys)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    fuse = sub.add_parser("fuse", help="gradient fusion: merge concepts into one checkpoint",
                          formatter_class=HelpWithDefaults)
    fuse.add_argument("--base", type=Path, required=True, metavar="MODEL.safetensors",
                      help="base SD1 or SDXL checkpoint (the file says which; SDXL runs in half precision)")
    fuse.add_argument("--concept", action="append", required=True,
                      metavar="FILE[:<new1>+<new2>][#trigger words][@UNET,TEXT]",
                      help="concept file, optionally with new token names, the trigger words of a LoRA without tokens "
                           "('#' right after the file's suffix: 'lora.safetensors#ohwx man'; default: the activation "
                           "text of its .json, else its most frequent training tag) and its own merge weights "
                           "('@' and two numbers at the end); repeat for each concept")
    fuse.add_argument("--out", type=Path, required=True, metavar="FUSED.safetensors")
    fuse.add_argument("--device", default="cpu")
    fuse.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="dtype of the saved weights")
    fuse.add_argument("--solver", choices=("exact", "lbfgs"), default="exact")
    fuse.add_argument("--spatial-steps", type=int, default=20)
    fuse.add_argument("--spatial-size", type=int, default=512)
    fuse.add_argument("--spatial-seeds", type=int, default=4,
                      help="noise seeds per concept in the spatial stage, sampled as one batch")
    fuse.add_argument("--seed", type=int, default=0)
    fuse.add_argument("--check-steps", type=int, default=8,
                      help="the picture check's sampling steps per concept (the report's verdict); 0: no check")
    fuse.add_argument("--templates", metavar="'photo of a {};{}'",
                      help="the solve's prompt templates, separated by ';', each with one {} where the concept's "
                           "tokens or trigger words go (default: the authors' two for token concepts, a few "
                           "caption forms for trigger words)")
    fuse.add_argument("--memory-gb", type=float, default=8.0,
                      help="what the whole fusion process may hold on the CPU: the model part a stage needs, one "
                           "batch's work and the statistics; layers whose statistics do not fit beside the rest are "
                           "recorded in further passes, and a budget too small for the model and one layer is "
                           "refused before any work (default 8)")
    fuse.add_argument("--vram-gb", type=float, default=None,
                      help="the same for the GPU's memory with --device cuda (default: 90%% of the card)")
    fuse.add_argument("--no-balance", action="store_true",
                      help="the authors' plain sum of squared errors instead of weighing every concept alike")
    fuse.add_argument("--ridge", type=float, default=None,
                      help="one fixed regularisation strength for every layer (relative to its mean input "
                           "energy) instead of choosing it per layer on validation prompts and a seed")
    fuse.add_argument("--no-held-out", action="store_true",
                      help="skip the held-out prompts and seed (the report then has no held-out errors)")
    fuse.add_argument("--progress", choices=("bar", "jsonl"), default="bar",
                      help="a progress bar on stderr, or JSON lines on stdout for a parent process: "
                           '{"progress": {...}} while it runs, then {"result": {...}}')
    fuse.add_argument("--skip-stage", action="append", choices=("te", "kv", "spatial"), default=[])
    fuse.add_argument("--unet-weight", type=float, default=1.0, help="LoRA weight of every concept in the UNet")
    fuse.add_argument("--text-weight", type=float, default=1.0, help="LoRA weight in the text encoder")
    fuse.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    training_cli.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command in ("demo", "fuse", "train") and (missing := missing_ldm()):
        print(f"error: `{args.command}` {missing}", file=sys.stderr)
        return 2
    if args.command == "demo":
        from lib_mos.cli.demo import run_demo

        run_demo(args.out, seed=args.seed, full=args.full, threads=args.threads or None)
    elif args.command == "convert":
        return _convert(args.input, args.output, embedding=args.embedding, name=args.name, overwrite=args.overwrite,
                        trigger=args.trigger, family=args.family)
    elif args.command == "fuse":
        return _fuse(args)
    elif args.command == "train":
        return training_cli.run(args)
    return 0


class ProgressBar:
    """A tqdm-style line on stderr for `fusion.Progress` calls: stage and action, a bar, done/total,
    elapsed<remaining, rate, and the current layer. what = "<stage>: <action>[: <detail>]"; a new
    stage/action starts a new line. Not on a terminal (a log file, a pipe) the bar is not redrawn:
    one line every `every` seconds and one when a stage/action completes."""

    def __init__(self, stream=None, width: int = 24, *, live: bool | None = None, every: float = 30.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.live = live if live is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self.key: str | None = None
        self.start = 0.0
        self.first = 0  # units already done when the bar started (0 when the stage announced itself)
        self.printed = float("-inf")  # when the last line was written (not live)
        self.open = False

    def __call__(self, what: str, done: int, total: int) -> None:
        import shutil
        import time

        key, _, detail = what.partition(": ")
        action, _, detail = detail.partition(": ")
        key = f"{key}: {action}" if action else key
        now = time.perf_counter()
        if key != self.key:
            self.close()
            self.key, self.start, self.first, self.printed = key, now, done, float("-inf")
        elapsed = now - self.start
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        filled = self.width * done // max(total, 1)
        unit = _UNITS.get(action.split(" ")[0], "step")
        speed = (f"{_clock(elapsed)}<{_clock((total - done) / rate)}, {rate:.2f} {unit}/s" if rate > 0
                 else f"{_clock(elapsed)}<?, ? {unit}/s")
        line = f"{key} |{'#' * filled}{'.' * (self.width - filled)}| {done}/{total} [{speed}] "
        if not self.live:
            if done >= total or now - self.printed >= self.every:
                self.stream.write(line + detail + "\n")
                self.stream.flush()
                self.printed = now
            if done >= total:
                self.key = None
            return
        room = shutil.get_terminal_size((120, 20)).columns - 1
        if len(line) + len(detail) > room:  # a layer name is told apart by its end
            detail = "..." + detail[len(line) + len(detail) - room + 3:] if room - len(line) > 3 else ""
        self.stream.write("\r" + (line + detail)[:room].ljust(room))
        self.open = True
        if done >= total:
            self.close()
        self.stream.flush()

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
        self.open, self.key = False, None


_UNITS = {"solving": "layer", "recording": "concept", "checking": "concept"}  # per action; sampling counts steps


def _stop_on_terminate() -> None:
    """SIGTERM (how a parent stops a fusion) unwinds like Ctrl-C, so the temporary statistics
    folder and any partial output are removed on the way out; the default action would end the
    process without running any cleanup."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, interrupt)


def _json_line(message: dict) -> None:
    import json

    print(json.dumps(message), flush=True)


def _json_progress(what: str, done: int, total: int) -> None:
    """`--progress jsonl`: one line per finished unit (the start-of-stage 0/total calls are left out)."""
    if done > 0:
        _json_line({"progress": {"what": what, "done": done, "total": total}})


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes:02d}:{secs:02d}"


def _templates(text: str | None) -> tuple[str, ...] | None:
    """`--templates 'photo of a {};{}'` -> ("photo of a {}", "{}"); a ValueError naming the option."""
    if text is None:
        return None
    templates = tuple(t.strip() for t in text.split(";"))
    for t in templates:
        if t.count("{}") != 1:
            found = "no {}" if "{}" not in t else f"{t.count('{}')} {{}}"
            raise ValueError(f"--templates: {t!r} has {found}; each ';'-separated template needs exactly one {{}} "
                             "where the concept's tokens or trigger words go")
    return templates


def _trigger_note(path, concept, hint: str) -> str:
    """One line: which trigger words a concept uses and where they came from (`Concept.trigger_source`)."""
    words = ", ".join(f'"{w}"' for w in concept.triggers)
    source = concept.trigger_source or "the file"
    if source == "given":
        return f"{path}: trigger words {words} as given"
    return f"{path}: trigger words {words} from {source}; {hint}"


FUSION_MMAP_THRESHOLD = 4 << 20  # bytes; bench/fusion.py --mixed runs its workers with the same


def _steady_allocator() -> None:
    """A fixed glibc mmap threshold for the fusion process. glibc raises its threshold to the size
    of each large block freed, so the per-layer float64 buffers the fusion allocates for every
    concept then come from the heap, which is not given back: peak RSS grew with the number of
    concepts (1.09x to 1.43x from 2 to 8 in bench/fusion.py --mixed). With blocks of 4 MiB and more
    always mapped on their own, freed buffers return to the system (1.03x). No-op off glibc."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, FUSION_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _fuse(args: argparse.Namespace) -> int:
    """Fuse with a progress bar on stderr; bad input is one line naming the file, and no file.
    Before the work starts, one line per trigger-word concept says which words it uses (stdout; a
    `{"note": ...}` line with --progress jsonl)."""
    import dataclasses
    import time

    import torch

    from lib_mos.concepts.concept import ConceptError
    from lib_mos.concepts.files import family_of_file, read_concept
    from lib_mos.fusion import checkpoint as fused_checkpoint
    from lib_mos.fusion import pipeline as fusion
    from lib_mos.fusion import report as fusion_report
    _steady_allocator()
    jsonl = args.progress == "jsonl"
    progress = _json_progress if jsonl else ProgressBar()
    t0 = time.perf_counter()
    _stop_on_terminate()
    try:
        extra = {} if args.ridge is None else {"ridge": args.ridge, "validate": False}
        settings = fusion.FusionSettings(solver=args.solver, spatial_steps=args.spatial_steps,
                                         spatial_size=args.spatial_size, spatial_seeds=args.spatial_seeds,
                                         seed=args.seed, skip=frozenset(args.skip_stage),
                                         held_out=not args.no_held_out, templates=_templates(args.templates),
                                         memory_gb=args.memory_gb, vram_gb=args.vram_gb,
                                         balance=not args.no_balance,
                                         check_steps=args.check_steps, **extra)
        specs = [fused_checkpoint.parse_concept_spec(c, args.unet_weight, args.text_weight) for c in args.concept]
        # read here (once: fuse_checkpoint takes them as read) to say which trigger words are used
        # each file for the family it says; one that does not match the base is refused by name later
        specs = [dataclasses.replace(s, concept=read_concept(s.path, trigger=s.trigger, family=family_of_file(s.path)))
                 for s in specs]
        for spec in specs:
            if not spec.concept.tokens:
                note = _trigger_note(spec.path, spec.concept, "add #WORDS to its --concept to choose others")
                if jsonl:
                    _json_line({"note": note})
                else:
                    print(note, flush=True)
        path, result = fused_checkpoint.fuse_checkpoint(args.base, specs, args.out, settings,
                                              dtype=torch.float16 if args.dtype == "fp16" else torch.float32,
                                              overwrite=args.overwrite, device=args.device, progress=progress)
    except (ConceptError, ValueError, OSError) as exc:
        getattr(progress, "close", lambda: None)()
        return _fail(str(exc))
    except KeyboardInterrupt:
        getattr(progress, "close", lambda: None)()
        return _fail(f"{args.out}: interrupted; nothing was written")
    except Exception as exc:  # a bug: the traceback for a report, then the one line a parent shows
        import traceback

        getattr(progress, "close", lambda: None)()
        traceback.print_exc()
        return _fail(f"{args.out}: unexpected {type(exc).__name__}: {exc}; nothing was written")
    if jsonl:
        _json_line({"result": {"path": str(path), "report": result.report, "warnings": result.warnings,
                               "seconds": result.seconds, "peak_rss_mb": result.peak_rss_mb}})
        return 0
    print(fusion_report.format_report(result.report, result.warnings))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"wrote {path} ({len(result.concepts)} concepts; {stages}; total {time.perf_counter() - t0:.1f} s)")
    return 0


def _convert(src: Path, dst: Path, *, embedding: Path | None, name: str | None, overwrite: bool,
             trigger: str | None = None, family: str = "auto") -> int:
    """Read, validate, write; a bad input is one line on stderr and no output file, because this
    runs in scripts and batch jobs where a traceback hides which of many files was at fault. A
    trigger-word concept's words are named with where they came from (the user should know when
    they were guessed from the training tags)."""
    from lib_mos.concepts.concept import ConceptError
    from lib_mos.concepts.files import family_of_file, read_concept, write_concept
    from lib_mos.models.family import family_named

    try:
        if trigger is not None and embedding is not None:
            raise ConceptError("--trigger and --embedding: give one or the other (trigger words stand for a LoRA "
                               "used without an embedding, an embedding's tokens for one used with it)")
        if dst.exists() and not overwrite:
            raise ConceptError(f"{dst}: already exists (pass --overwrite to replace it)")
        if dst.resolve() == src.resolve():
            raise ConceptError(f"{dst}: the output would replace the input")
        model_family = family_of_file(src) if family == "auto" else family_named(family)
        concept = read_concept(src, embedding=embedding, name=name, trigger=trigger, family=model_family)
        written = write_concept(concept, dst, overwrite=overwrite)
    except ConceptError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{dst}: {exc}")
    except Exception as exc:  # still one line naming the file: the promise holds for bugs too
        return _fail(f"{src}: unexpected {type(exc).__name__}: {exc}")
    if not concept.tokens:
        print(_trigger_note(src, concept, "pass --trigger to choose others"))
    words = (f"tokens {' '.join(concept.tokens)}, {concept.layers} layers, width {concept.dim}" if concept.tokens
             else f"trigger words {', '.join(concept.triggers)}")
    print(
        f"wrote {written}: {concept.family.label} concept {concept.name!r}, {words}, "
        f"rank {concept.rank if concept.rank is not None else 'mixed'}, "
        f"{len(concept.unet_lora) + len(concept.text_lora)} LoRA targets "
        f"({len(concept.unet_lora)} UNet, {len(concept.text_lora)} text encoder)"
    )
    return 0


def _fail(message: str) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 1

