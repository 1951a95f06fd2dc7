"""The core room: what every other room builds on (labels, config, errors, paths, run folders,
runtime). ``VERSION`` is the package's version, here so that any room can read it without
importing the package top (which imports every room)."""

VERSION = "0.1.0"
