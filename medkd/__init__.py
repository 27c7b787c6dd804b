"""medkd: MONAI-native knowledge distillation for medical imaging (one teacher, two students, diversified)."""

__version__ = "0.1.0"
