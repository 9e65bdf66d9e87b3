"""Who may change what is served: the limits on ModelService.HandleReloadConfigRequest.

TF Serving lets any caller that reaches its gRPC port replace the served models and point a
model's request log anywhere the server can write. fer-serve narrows that: a reload may
only name base paths and request-log prefixes under the roots the operator allowed when the
server started (`--allowed-root`, repeatable; default the directory of `--model-config`),
and `--no-reload-config` switches the method off. A refused reload changes nothing and
creates nothing (no model is loaded, no log directory made). The models.config file itself
is the operator's and is not checked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from fer_pipeline.core import fileio
from fer_pipeline.core.serving_root import ModelSpec
from fer_pipeline.serving.model_manager import ServingError

__all__ = ["ReloadPolicy", "ReloadRefused"]


class ReloadRefused(ServingError):
    """A reload the policy does not allow (gRPC answers it with its code and message)."""


def _normal(path: str) -> str:
    """`path` with symlinks and `..` resolved (URIs: their text without a trailing /)."""
    if fileio.is_uri(path):
        return path.rstrip("/")
    return os.path.realpath(os.path.abspath(path))


def _under(path: str, root: str) -> bool:
    if fileio.is_uri(path) != fileio.is_uri(root):
        return False
    separator = "/" if fileio.is_uri(root) else os.sep
    return path == root or path.startswith(root.rstrip(separator) + separator)


@dataclass(frozen=True)
class ReloadPolicy:
    """Whether reloads are allowed at all, and under which roots."""
    roots: tuple[str, ...]
    enabled: bool = True

    @classmethod
    def for_server(cls, model_config: str, allowed_roots: Optional[Sequence[str]] = None,
                   enabled: bool = True) -> "ReloadPolicy":
        """The policy of a server started with `--model-config model_config`: the given
        roots, or the directory of models.config when none is given."""
        roots = list(allowed_roots or [fileio.parent(model_config) if fileio.is_uri(
            model_config) else os.path.dirname(os.path.abspath(model_config))])
        return cls(tuple(_normal(root) for root in roots), enabled)

    def check_enabled(self) -> None:
        """ReloadRefused (UNIMPLEMENTED) when reloads are switched off."""
        if not self.enabled:
            raise ReloadRefused("UNIMPLEMENTED",
                                "HandleReloadConfigRequest is switched off on this server "
                                "(fer-serve --no-reload-config); change models.config instead")

    def check(self, specs: Iterable[ModelSpec]) -> None:
        """ReloadRefused naming the first path outside the allowed roots (or that reloads
        are switched off); returns when every base path and log prefix is allowed."""
        self.check_enabled()
        for spec in specs:
            paths = [("base_path", spec.base_path)]
            if spec.request_log is not None:
                paths.append(("request log filename_prefix", spec.request_log.filename_prefix))
            for what, path in paths:
                if not any(_under(_normal(path), root) for root in self.roots):
                    raise ReloadRefused(
                        "INVALID_ARGUMENT",
                        f"model {spec.name}: {what} {path} is outside the roots this server "
                        f"allows ({', '.join(self.roots)}; fer-serve --allowed-root); "
                        "nothing was changed")
