"""``heterofl-edge data check``: verify MNIST files against their original md5s."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heterofl_edge.data.mnist import check_mnist_files, load_mnist
from heterofl_edge.errors import DataError

app = typer.Typer(help="Data sets.", no_args_is_help=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="HETEROFL_DATA_DIR",
        help="Folder with the MNIST idx files (or set HETEROFL_DATA_DIR).",
    ),
]


@app.command()
def check(data_dir: DataDirOption = None) -> None:
    """Check the four MNIST .gz files' md5s and that they parse."""
    data = load_mnist(data_dir)
    assert data_dir is not None  # load_mnist refused None already
    report = check_mnist_files(data_dir)
    for name, verdict in report.items():
        typer.echo(f"{name}: {verdict}")
    bad = [n for n, v in report.items() if v not in ("ok", "missing")]
    if bad:
        raise DataError(f"md5 mismatch for {', '.join(bad)}", "download those files again")
    typer.echo(
        f"MNIST readable: {len(data.train_labels)} training and "
        f"{len(data.test_labels)} test examples"
    )
