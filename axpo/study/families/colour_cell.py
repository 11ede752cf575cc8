"""``colour_cell`` (perception): the colour of one cell of a grid, visible only when zoomed in.

The image is a 4×4 grid of square cells. Each cell is a checkerboard of 2-pixel squares in a
colour *c* and its complement 255 - *c*. At the image's full resolution the pattern shows *c*;
downscaled by 4 (a 256 px image under a 64×64 pixel budget, as the study model's image
processor does), each output pixel averages two squares of each kind and every cell becomes
the same flat grey, so the colours are gone from what the model sees. The question names a cell
by row and column; ``image_zoom_in_tool`` on that cell's box crops the original, whose 64 px
crop fits the budget unscaled and shows the pattern again.

The answer is the colour's number in the six-colour legend given in the question (chance 1/6).
The tool call a demonstration writes is the cell's box in 0-1000 coordinates, multiples of 250:
four numbers a small model can write reliably. The complement of no palette colour is close to
another palette colour, so a crop whose squares are shifted by one pixel does not read as a
different valid colour by accident.

The side must be a multiple of 128 (cells of whole 2-pixel squares, aligned).
"""

from __future__ import annotations

from axpo.contracts.domain import AnswerKind
from axpo.study.task import Task, png_bytes, rng_for

FAMILY = "colour_cell"
TOOL = "image_zoom_in_tool"
GRID = 4
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (225, 35, 35)),
    ("green", (40, 190, 50)),
    ("blue", (40, 60, 225)),
    ("white", (240, 240, 240)),
    ("orange", (245, 150, 30)),
    ("purple", (150, 45, 200)),
)
LEGEND = ", ".join(f"{i} {name}" for i, (name, _) in enumerate(PALETTE))


def cell_box_1000(row: int, col: int) -> tuple[int, int, int, int]:
    """The 0-1000 box of the cell in ``row``, ``col`` (1-based)."""
    step = 1000 // GRID
    return ((col - 1) * step, (row - 1) * step, col * step, row * step)


def generate(seed: int, image_size: int) -> Task:
    from PIL import Image as PILImage

    if image_size % 128:
        raise ValueError(f"{FAMILY}: image_size must be a multiple of 128, got {image_size}")
    rng = rng_for(FAMILY, seed, image_size)
    colours = [rng.randrange(len(PALETTE)) for _ in range(GRID * GRID)]
    cell = image_size // GRID
    square = image_size // 128  # 2 px at 256: averaged away at a 4x downscale
    # Build one row of cells at a time as raw bytes: fast, and exact (no drawing filters).
    rows = bytearray()
    for r in range(GRID):
        for y in range(cell):
            for c in range(GRID):
                rgb = PALETTE[colours[r * GRID + c]][1]
                inverse = tuple(255 - v for v in rgb)
                for x in range(cell):
                    odd = ((x // square) + (y // square)) % 2
                    rows += bytes(inverse if odd else rgb)
    img = PILImage.frombytes("RGB", (image_size, image_size), bytes(rows))
    row, col = rng.randrange(1, GRID + 1), rng.randrange(1, GRID + 1)
    answer = colours[(row - 1) * GRID + (col - 1)]
    question = (
        f"What colour is the cell in row {row}, column {col} of the grid? Colours: {LEGEND}. "
        "Answer with the colour's number."
    )
    box = cell_box_1000(row, col)
    return Task(
        task_id=f"{FAMILY}-{image_size}-{seed}",
        question=question,
        image=png_bytes(img),
        gold=str(answer),
        kind=AnswerKind.NUMBER,
        box_1000=box,
        answer_text=PALETTE[answer][0],
        family=FAMILY,
        seed=seed,
        tool=TOOL,
        tool_arguments={"bbox_2d": list(box), "label": f"row {row} column {col}"},
        chance=1 / len(PALETTE),
    )
