"""Prompts for the core tests: sentences from standard-library docstrings, in the tiny
tokenizer's domain."""

PROMPTS = [
    "Return a new string with the characters of the template substituted.",
    "The logging module defines functions and classes for a flexible event logging system.",
    "Create a new parser object with the given arguments.",
    "A dictionary that remembers insertion order.",
    "Split the path into a pair of head and tail.",
    "Deserialize a JSON document to a Python object.",
    "Wrap a single paragraph of text, returning a list of wrapped lines.",
    "Counter is a dict subclass for counting hashable objects.",
    "Parse a message from a string and return the message structure.",
    "Return the final path component, without its suffix.",
    "Format a record as text with the given format string.",
    "hello world",
]
