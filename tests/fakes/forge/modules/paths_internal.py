from modules.paths import data_path, models_path, script_path  # noqa: F401

extensions_dir = extensions_builtin_dir = script_path
