"""TensorBoard scalars that mirror metrics.jsonl (train.py --tensorboard), as the original logged every epoch.

Each epoch's record becomes one scalar per number at step = the record's 1-based epoch: `train_loss`, `natural_acc`,
`gamma`, ... under their own names, nested maps under `<key>/<name>` (`per_layer_keep/conv1`), booleans as 0 or 1.
TensorBoard is an optional dependency: torch.utils.tensorboard needs the `tensorboard` package, and without it
the option fails at set-up with one line saying what to install.
"""
from typing import Any, Iterator, Mapping, Optional, Tuple

from configs.errors import UserError


class EpochScalars:
    """Writes epoch records as TensorBoard scalars into `directory` (created with the first record)."""

    def __init__(self, directory: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch.utils.tensorboard imports the tensorboard package
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from err
        self.directory, self._writer_class = directory, SummaryWriter
        self._writer: Optional[Any] = None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=self.directory)
        step = int(record["epoch"])
        for tag, value in scalars(record):
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # an interrupted run keeps every finished epoch

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, float]]:
    """(tag, value) for every number of `record` but its epoch, nested maps flattened with '/'."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (bool, int, float)) and tag != "epoch":
            yield tag, float(value)

