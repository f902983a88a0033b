"""The toy world's scenes and the captions that describe them.

A scene is one shape of one colour on a background. Plain captions name only the colour, the
shape and the background; rich captions add size, position, sharpness and background texture.
The scene distribution is chosen so that a plain caption leaves size, position and sharpness
free (most scenes are small, off-centre or blurry), while each rich word pins one of them down.
That gap is the lever CRAFT pulls: variants written with rich words produce better images for
the same plain prompt, and fine-tuning on them moves plain-prompt outputs toward them.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Iterable

# RGB values are 0..255. Colour names are also the background names.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 50),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "medium", "large")
SHARPNESS: tuple[str, ...] = ("sharp", "blurry")
TEXTURES: tuple[str, ...] = ("plain", "noisy")
# Position name -> unit direction of the offset from the centre (x right, y down).
POSITIONS: dict[str, tuple[float, float]] = {
    "in the center": (0.0, 0.0),
    "in the top left": (-0.7071, -0.7071),
    "in the top right": (0.7071, -0.7071),
    "in the bottom left": (-0.7071, 0.7071),
    "in the bottom right": (0.7071, 0.7071),
    "at the top": (0.0, -1.0),
    "at the bottom": (0.0, 1.0),
    "on the left": (-1.0, 0.0),
    "on the right": (1.0, 0.0),
}

# The prior over unmentioned attributes: what a plain prompt leaves to chance. Most mass is on
# the poor values so that plain prompts yield a spread in which only some samples are good.
SIZE_PRIOR = {"small": 0.40, "medium": 0.35, "large": 0.25}
CENTER_PRIOR = 0.30  # probability of "in the center"; the rest is spread over the 8 others
SHARP_PRIOR = 0.40
PLAIN_PRIOR = 0.50

# The attributes a rich caption may mention, in caption order.
ATTRIBUTES: tuple[str, ...] = ("size", "sharpness", "position", "texture")

PLAIN_TEMPLATE = "a {colour} {shape} on a {background} background"


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything the renderer needs; the captions are derived from it, never the reverse."""

    colour: str
    shape: str
    background: str
    size: str = "medium"
    position: str = "in the center"
    sharpness: str = "sharp"
    texture: str = "plain"
    seed: int = 0  # drives the continuous jitter (exact radius, offset, blur, noise)

    def __post_init__(self) -> None:
        checks = [
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("background", self.background, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, tuple(POSITIONS)),
            ("sharpness", self.sharpness, SHARPNESS),
            ("texture", self.texture, TEXTURES),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"Scene.{name}={value!r} is not one of {list(allowed)}")
        if self.colour == self.background:
            raise ValueError(
                f"Scene colour and background are both {self.colour!r}; the object would be "
                "invisible. Pick a different background colour."
            )


def plain_caption(colour: str, shape: str, background: str) -> str:
    return PLAIN_TEMPLATE.format(colour=colour, shape=shape, background=background)


def caption(scene: Scene, mention: Iterable[str] = ()) -> str:
    """Describe ``scene``, naming only the attributes in ``mention`` (a subset of ATTRIBUTES).

    With nothing mentioned this is exactly the plain caption. Every mentioned word is true of the
    scene, so the model can learn what each word means.
    """
    mention = set(mention)
    unknown = mention - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"mention contains {sorted(unknown)}; allowed: {list(ATTRIBUTES)}")
    words = ["a"]
    if "size" in mention:
        words.append(scene.size)
    if "sharpness" in mention:
        words.append(scene.sharpness)
    words += [scene.colour, scene.shape]
    if "position" in mention:
        words += [scene.position, "of a"]
    else:
        words += ["on a"]
    if "texture" in mention:
        words.append(scene.texture)
    words += [scene.background, "background"]
    return " ".join(words)


_COLOUR_RE = "|".join(COLOURS)
_CAPTION_RE = re.compile(
    rf"^a (?:(?P<size>{'|'.join(SIZES)}) )?(?:(?P<sharpness>{'|'.join(SHARPNESS)}) )?"
    rf"(?P<colour>{_COLOUR_RE}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"(?:(?P<position>{'|'.join(POSITIONS)}) of a|on a) "
    rf"(?:(?P<texture>{'|'.join(TEXTURES)}) )?(?P<background>{_COLOUR_RE}) background$"
)


def parse_caption(text: str) -> dict[str, str]:
    """Read a toy caption back into its named attributes (only those it mentions).

    Rewards score images against the *original* prompt, so they need its colour, shape and
    background; a caption outside the toy grammar cannot be scored and says so.
    """
    m = _CAPTION_RE.match(" ".join(text.strip().lower().split()))
    if m is None:
        raise ValueError(
            f"{text!r} is not a toy-world caption. Expected the form "
            f"'{PLAIN_TEMPLATE}' (optionally with size/sharpness/position/texture words), "
            f"colours {list(COLOURS)}, shapes {list(SHAPES)}."
        )
    return {k: v for k, v in m.groupdict().items() if v is not None}


def sample_scene(rng: random.Random, colour: str | None = None, shape: str | None = None,
                 background: str | None = None) -> Scene:
    """Draw a scene from the world's prior; fixed arguments pin those attributes."""
    colour = colour or rng.choice(COLOURS)
    shape = shape or rng.choice(SHAPES)
    if background is None:
        background = rng.choice([c for c in COLOURS if c != colour])
    size = rng.choices(list(SIZE_PRIOR), weights=list(SIZE_PRIOR.values()))[0]
    if rng.random() < CENTER_PRIOR:
        position = "in the center"
    else:
        position = rng.choice([p for p in POSITIONS if p != "in the center"])
    sharpness = "sharp" if rng.random() < SHARP_PRIOR else "blurry"
    texture = "plain" if rng.random() < PLAIN_PRIOR else "noisy"
    return Scene(colour, shape, background, size, position, sharpness, texture,
                 seed=rng.randrange(2**31))


def all_plain_prompts() -> list[str]:
    """Every plain prompt of the world (8 colours x 3 shapes x 7 backgrounds = 168)."""
    return [plain_caption(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def toy_prompt_split(seed: int = 0, num_eval: int = 48) -> tuple[list[str], list[str]]:
    """A fixed split of the plain prompts into training and held-out evaluation prompts."""
    prompts = all_plain_prompts()
    rng = random.Random(seed)
    rng.shuffle(prompts)
    return sorted(prompts[num_eval:]), sorted(prompts[:num_eval])


# The favourable value of each attribute: what a "richer" rewrite asks for.
RICH_VALUES = {"size": "large", "sharpness": "sharp", "position": "in the center", "texture": "plain"}


def rich_caption(plain: str, attributes: Iterable[str] = ATTRIBUTES) -> str:
    """Rewrite a plain prompt with the favourable value of each named attribute."""
    p = parse_caption(plain)
    scene = Scene(p["colour"], p["shape"], p["background"], **{
        a: RICH_VALUES[a] for a in ("size", "sharpness", "position", "texture")})
    return caption(scene, mention=attributes)


def template_variants(plain: str, num_variants: int, seed: int = 0) -> list[str]:
    """V richer rewrites of a plain prompt, in the toy vocabulary (the offline LLM stand-in).

    The first variant names every favourable attribute; the others name random non-empty
    subsets (at least two words), so the variants differ from each other the way LLM rewrites do.
    Deterministic in (plain, seed).
    """
    if num_variants < 0:
        raise ValueError(f"num_variants must be >= 0, got {num_variants}")
    rng = random.Random(f"{seed}:{plain}")
    subsets: list[tuple[str, ...]] = [ATTRIBUTES]
    pool = [tuple(a for a, keep in zip(ATTRIBUTES, mask) if keep)
            for mask in ((i >> 0 & 1, i >> 1 & 1, i >> 2 & 1, i >> 3 & 1) for i in range(16))]
    pool = [s for s in pool if len(s) >= 2 and s != ATTRIBUTES]
    rng.shuffle(pool)
    subsets += pool
    while len(subsets) < num_variants:  # more variants than distinct subsets: repeat
        subsets += pool
    return [rich_caption(plain, s) for s in subsets[:num_variants]]
