from fdl.models import vision  # noqa: F401
