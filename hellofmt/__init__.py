"""hellofmt: distilled image datasets whose soft labels are generated on the fly (HeLlO)."""

from __future__ import annotations

__version__ = "0.2.0"

from .errors import HellofmtError  # noqa: E402

__all__ = ["BuildConfig", "DistilledDataset", "HellofmtError", "__version__", "build_bundle", "evaluate"]


def __getattr__(name: str):
    # DistilledDataset pulls in torch and open_clip; importing it lazily keeps `import hellofmt`
    # (and the CLI's start-up) light.
    if name == "DistilledDataset":
        from .dataset import DistilledDataset

        return DistilledDataset
    if name == "build_bundle":
        # The builder (training code, teachers) is imported only when asked for, so the runtime
        # never loads it.
        from .builder import build_bundle

        return build_bundle
    if name == "BuildConfig":
        # The build options (no torch), from the builder package, imported on demand for the same reason.
        from .builder.config import BuildConfig

        return BuildConfig
    if name == "evaluate":
        # Student training (torch, the builder's teacher loaders) only when asked for.
        from .evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'hellofmt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "DistilledDataset", "build_bundle", "BuildConfig", "evaluate"])
