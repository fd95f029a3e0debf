"""Double of modules/paths.py: ``models_path`` is the WebUI's models folder (tests point it at a temporary one)."""

import os

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_path = script_path
models_path = os.path.join(script_path, "models")
