"""Lightning's checkpoint writer and reader for vaegan's runs: `vaegan.formats.checkpoints` underneath, so a
checkpoint is renamed into place only once whole, and one that is not whole is refused with a message naming it."""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io import TorchCheckpointIO

from vaegan.formats.checkpoints import check_complete, save_checkpoint, unreadable


class WholeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, for local files through `vaegan.formats.checkpoints` (remote ones: Lightning's)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # Tensors and plain containers only: nothing in a checkpoint is unpickled as code.
        weights_only = True if weights_only is None else weights_only
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        check_complete(path)
        try:
            return super().load_checkpoint(path, map_location, weights_only)
        except Exception as error:  # zip, pickle and unpickler errors of a damaged file come in many types
            raise unreadable(path, error) from error
