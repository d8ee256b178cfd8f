"""Performance you can read without a GPU: the cards, the dry-run launch recorder, the cost model and explain."""
from .cards import CARDS, Card
from .explain import Explanation, against_measured, calibration, dry_run, explain

__all__ = ["CARDS", "Card", "Explanation", "against_measured", "calibration", "dry_run", "explain"]
