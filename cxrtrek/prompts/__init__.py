"""Prompt templates, kept as files beside this module and rendered strictly."""
