from .draft_dice import DraftDice

__all__ = ["DraftDice"]
