"""Experiment recipes, one TOML file per paper experiment (installed as capstf.pipelines)."""
