"""Where the toy world's committed weights live, and loading them as one bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib_mos.concepts.concept import Concept
from lib_mos.concepts.files import read_concept
from lib_mos.models.sd1 import SD1Model
from lib_mos.toyworld import base, world
from lib_mos.toyworld.codec import PatchCodec
from lib_mos.toyworld.novel import NOVEL
from lib_mos.toyworld.probe import Probe

WEIGHTS = Path(__file__).resolve().parent / "weights"
BASE = "base.safetensors"
CODEC = "codec.safetensors"
ATTRIBUTE_PROBE = "probe-attributes.safetensors"
CONCEPT_PROBE = "probe-concepts.safetensors"
CONCEPTS = "concepts"


def concept_path(folder: Path, style: str) -> Path:
    return folder / CONCEPTS / f"{style}.safetensors"


def available(folder: Path = WEIGHTS) -> bool:
    """True when the base, codec, probes and every novel concept are present."""
    need = [BASE, CODEC, ATTRIBUTE_PROBE, CONCEPT_PROBE]
    return all((folder / n).is_file() for n in need) and all(concept_path(folder, c.style).is_file() for c in NOVEL)


@dataclass
class ToyWorld:
    model: SD1Model
    codec: PatchCodec
    attribute_probe: Probe
    concept_probe: Probe
    concepts: list[Concept]  # in world.STYLES order: concept i is concept-probe class i

    @property
    def classes(self) -> list[str]:
        """The shape word of each concept (what a global prompt calls it)."""
        return [world.STYLES[c.style][0] for c in NOVEL]


def load(folder: Path = WEIGHTS) -> ToyWorld:
    if not available(folder):
        raise FileNotFoundError(f"{folder}: the toy world's weights are missing; see docs/toyworld.md to train them")
    return ToyWorld(model=base.load_base(folder / BASE), codec=PatchCodec.load(folder / CODEC),
                    attribute_probe=Probe.load(folder / ATTRIBUTE_PROBE)[0],
                    concept_probe=Probe.load(folder / CONCEPT_PROBE)[0],
                    concepts=[read_concept(concept_path(folder, c.style)) for c in NOVEL])
