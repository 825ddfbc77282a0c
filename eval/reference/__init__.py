"""The reference lab: a small fictional world, its task, and the teachers trained on it (the embedded default)."""

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
TEACHERS = ("teacher-a", "teacher-b")
