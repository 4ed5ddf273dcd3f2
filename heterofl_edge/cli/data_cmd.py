"""``heterofl-edge data check|export``: verify a data set; write its training split for devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heterofl_edge.cli.options import DataOption
from heterofl_edge.errors import ConfigError, DataError

app = typer.Typer(help="Data sets.", no_args_is_help=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="HETEROFL_DATA_DIR",
        help="Folder with the MNIST idx files (or set HETEROFL_DATA_DIR).",
    ),
]
AnyDataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="HETEROFL_DATA_DIR",
        help="Folder with the data set's files (HETEROFL_DATA_DIR: MNIST's).",
    ),
]


@app.command()
def check(data_dir: AnyDataDirOption = None, data: DataOption = "mnist") -> None:
    """Check a data set's files against their original md5s (where known) and load it."""
    from heterofl_edge.data.base import LanguageModelData
    from heterofl_edge.data.registry import get_dataset, resolve_dataset

    entry = resolve_dataset(data)
    dataset = get_dataset(data, data_dir)
    if entry.check_files is not None:
        assert data_dir is not None  # the loader refused None already
        report = entry.check_files(Path(data_dir))
        for name, verdict in report.items():
            typer.echo(f"{name}: {verdict}")
        bad = [n for n, v in report.items() if v not in ("ok", "missing")]
        if bad:
            raise DataError(f"md5 mismatch for {', '.join(bad)}", "download those files again")
    if isinstance(dataset, LanguageModelData):
        typer.echo(
            f"{entry.name} readable: vocabulary of {dataset.num_classes} tokens; rows of "
            f"{dataset.sequence_length} tokens: {len(dataset.train_tokens)} training, "
            f"{len(dataset.valid_tokens)} validation, {len(dataset.test_tokens)} test"
        )
    elif entry.name == "mnist":
        typer.echo(
            f"MNIST readable: {len(dataset.train_labels)} training and "
            f"{len(dataset.test_labels)} test examples"
        )
    else:
        typer.echo(
            f"{entry.name} readable: {len(dataset.train_labels)} training and "
            f"{len(dataset.test_labels)} test examples of shape "
            f"{tuple(dataset.train_images.shape[1:])} in {dataset.num_classes} classes"
        )


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Folder for train.safetensors (what devices read).")],
    data_dir: AnyDataDirOption = None,
    data: DataOption = "mnist",
    model: Annotated[
        str | None,
        typer.Option(
            help="Shape the examples for this model's input (an image folder's size and "
            "channels); default: the data set's own.",
        ),
    ] = None,
) -> None:
    """Write a data set's training split as arrays that a device reads without torch.

    Devices run 'heterofl-edge device --data arrays --data-dir FOLDER'; each takes
    its shard of the split as for any other data set.
    """
    from heterofl_edge.data.arrays import write_training_arrays
    from heterofl_edge.data.base import LanguageModelData
    from heterofl_edge.data.registry import get_dataset, resolve_dataset

    entry = resolve_dataset(data)
    fit_to = None
    if model is not None:
        from heterofl_edge.models import get_architecture

        fit_to = get_architecture(model).input_shape
    dataset = get_dataset(data, data_dir, fit_to=fit_to)
    if isinstance(dataset, LanguageModelData):
        raise ConfigError(
            f"{entry.name} is language-model data; 'data export' writes classification data",
            "devices read WikiText-2's text themselves: 'heterofl-edge device --data wikitext2'",
        )
    path = write_training_arrays(
        out,
        dataset.train_x.numpy(),
        dataset.train_y.numpy(),
        dataset.num_classes,
        entry.name,
    )
    typer.echo(
        f"wrote {path}: {len(dataset.train_y)} training examples of shape "
        f"{tuple(dataset.train_x.shape[1:])} in {dataset.num_classes} classes"
    )
