"""The shapes benchmark: exact, model-free scoring of images from the procedural shapes world.

    analysis.py  ``analyze`` reads an image back into objects and background; ``describe`` says what it read
    scoring.py   ``check`` scores a text-to-image spec, ``check_edit`` an edit
    runner.py    ``evaluate`` / ``evaluate_pipeline`` run a model over the fixed evaluation sets of
                 ``nextstep.data.shapes`` and report GenEval-style accuracies and GEdit-style edit scores;
                 ``format_table`` prints them
    figures.py   ``save_grid``: the images in a grid, framed by verdict and captioned
"""

from .analysis import Analysis, Detected, analyze, describe
from .figures import FAIL_COLOR, GRID_BORDER, GRID_CELL_MIN, INPUT_COLOR, PASS_COLOR, save_grid
from .runner import PSNR_CAP_DB, evaluate, evaluate_pipeline, format_table
from .scoring import check, check_edit

__all__ = ["FAIL_COLOR", "GRID_BORDER", "GRID_CELL_MIN", "INPUT_COLOR", "PASS_COLOR", "PSNR_CAP_DB", "Analysis",
           "Detected", "analyze", "check", "check_edit", "describe", "evaluate", "evaluate_pipeline", "format_table",
           "save_grid"]
