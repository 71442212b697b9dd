"""The one model class for parent and child: blocks, modeling, parent import, info, inference."""
