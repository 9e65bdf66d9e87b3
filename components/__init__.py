"""The pipeline's steps, one module or package each, none importing another (checked by
import-linter): each exposes `run_<step>(inputs..., output_dir, config[, beam_args])` and
its result type in `__all__`."""
