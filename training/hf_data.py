"""Local Hugging Face `datasets` as training data: a dataset saved with `save_to_disk`, or an image
folder read by `load_dataset("imagefolder", data_dir=...)` (diffusers' ImageFolder convention:
images plus metadata.jsonl/csv with a caption column). Nothing is downloaded; images are decoded
when a batch needs them (Arrow files are memory-mapped), so the dataset need not fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from training.data import ImageSource

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk


@dataclass
class DatasetImage:
    """Row `row` of a dataset's image column, decoded on demand (picklable for DataLoader workers)."""

    dataset: object
    column: str
    row: int

    def __call__(self) -> Image.Image:
        return self.dataset[self.row][self.column].convert("RGB")


def open_dataset(path: str):
    """The train split of a saved dataset (load_from_disk) or of an imagefolder data dir (load_dataset)."""
    import datasets

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--hf_dataset {folder} is not a folder (a dataset saved with save_to_disk, or an "
                                "image folder with metadata.jsonl); hub datasets are not downloaded here.")
    if any((folder / marker).is_file() for marker in SAVED_MARKERS):
        dataset = datasets.load_from_disk(str(folder))
    else:
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"--hf_dataset {folder} has splits {list(dataset)} but no 'train' split.")
        dataset = dataset["train"]
    return dataset


def image_column_of(dataset, requested: str) -> str:
    """`requested` if the dataset has it, else its only Image column (ImageFolder names it 'image')."""
    import datasets

    if requested in dataset.column_names:
        return requested
    images = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(images) != 1:
        raise ValueError(f"--image_column {requested!r} is not a column of the dataset ({dataset.column_names}) and "
                         f"it has {len(images)} image columns; set --image_column.")
    return images[0]


def hf_sources(path: str, image_column: str = "image", caption_column: str = "text") -> list[ImageSource]:
    dataset = open_dataset(path)
    column = image_column_of(dataset, image_column)
    if caption_column not in dataset.column_names:
        raise ValueError(f"--caption_column {caption_column!r} is not a column of the dataset "
                         f"({dataset.column_names}); set --caption_column.")
    captions = dataset[caption_column]  # one column read, no image decoded
    return [ImageSource(str(caption), loader=DatasetImage(dataset, column, row)) for row, caption in enumerate(captions)]
