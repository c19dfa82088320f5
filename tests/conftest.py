"""Suite-wide settings: no test, nor any script a test starts, downloads anything."""
import os

os.environ["URBANLENS_OFFLINE"] = "1"  # tests that serve weights locally lift it for themselves
