#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install everything
# the main job and the test suite need. Safe to re-run: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# tinysoundfont renders MIDI offline; its pyaudio dependency is only for live playback.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps tinysoundfont
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
