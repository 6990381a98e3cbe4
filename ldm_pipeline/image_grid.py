"""Labelled image grids drawn with PIL: column labels on top, row labels on the left (as A1111's
`draw_grid_annotations`), and several grids side by side under a title each (A1111's Z axis).

    layout = GridLayout.of(cell_size=(64, 64), x_labels=["Steps: 10", "Steps: 20"], y_labels=["Sampler: ddim"])
    grid = draw_grid([[image_a, image_b]], layout)         # rows of images
    layout.cell_box(row, column)                           # where a cell's image is pasted
    stacked = side_by_side([grid, grid2], ["CFG scale: 5", "CFG scale: 7"])

Columns are as wide as the widest label needs, so no label is cut or wrapped; a cell's image is
centred in its column.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = "white"
INK = "black"


def font_for(cell_size: tuple[int, int]) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font, sized to the cells as A1111 sizes it ((width + height) / 25), at least 12 px."""
    return ImageFont.load_default(size=max(12, sum(cell_size) // 25))


def text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - min(left, 0)), int(bottom - min(top, 0))


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a labelled grid goes (pixels)."""

    cell_size: tuple[int, int]
    column_width: int
    label_width: int  # the row labels' column (0 without row labels)
    label_height: int  # the column labels' row
    columns: int
    rows: int
    x_labels: tuple[str, ...]
    y_labels: tuple[str, ...]

    @classmethod
    def of(cls, cell_size: tuple[int, int], x_labels: list[str], y_labels: list[str]) -> "GridLayout":
        font = font_for(cell_size)
        pad = font.size // 2
        x_sizes = [text_size(font, label) for label in x_labels]
        y_sizes = [text_size(font, label) for label in y_labels]
        column_width = max([cell_size[0]] + [w + 2 * pad for w, _ in x_sizes])
        label_width = max([0] + [w + 2 * pad for w, _ in y_sizes])
        label_height = max(h for _, h in x_sizes) + 2 * pad
        return cls(cell_size, column_width, label_width, label_height, len(x_labels), max(1, len(y_labels)),
                   tuple(x_labels), tuple(y_labels))

    @property
    def size(self) -> tuple[int, int]:
        return self.label_width + self.columns * self.column_width, self.label_height + self.rows * self.cell_size[1]

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the image in a cell."""
        left = self.label_width + column * self.column_width + (self.column_width - self.cell_size[0]) // 2
        top = self.label_height + row * self.cell_size[1]
        return left, top, left + self.cell_size[0], top + self.cell_size[1]


def draw_grid(rows: list[list[Image.Image | None]], layout: GridLayout) -> Image.Image:
    """The images (rows of columns; None = an empty cell) with their labels."""
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = font_for(layout.cell_size)
    for c, label in enumerate(layout.x_labels):
        center = layout.label_width + c * layout.column_width + layout.column_width // 2
        draw.text((center, layout.label_height // 2), label, fill=INK, font=font, anchor="mm")
    for r, label in enumerate(layout.y_labels):
        draw.text((layout.label_width // 2, layout.label_height + r * layout.cell_size[1] + layout.cell_size[1] // 2),
                  label, fill=INK, font=font, anchor="mm")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is not None:
                left, top, right, bottom = layout.cell_box(r, c)
                grid.paste(image.convert("RGB").resize((right - left, bottom - top)), (left, top))
    return grid


def side_by_side(grids: list[Image.Image], titles: list[str], cell_size: tuple[int, int]) -> Image.Image:
    """Equal-sized grids in one row, each under its title (A1111's Z axis), a gap between them."""
    font = font_for(cell_size)
    pad = font.size
    title_height = max(text_size(font, t)[1] for t in titles) + pad
    width, height = grids[0].size
    canvas = Image.new("RGB", (len(grids) * width + (len(grids) - 1) * pad, title_height + height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (grid, title) in enumerate(zip(grids, titles)):
        left = i * (width + pad)
        draw.text((left + width // 2, title_height // 2), title, fill=INK, font=font, anchor="mm")
        canvas.paste(grid, (left, title_height))
    return canvas
