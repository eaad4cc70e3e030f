"""Questions and text-only conversations for the decoder's W8A8 calibration set (calibration/decoder_dataset.py).

Written for this project; no third-party text. Answers (targets) are not written here: the fp32
reference decoder generates them, so calibration sees the activations of the model's own answers.
Questions are chosen by the image's file-name prefix (doc_, chart_, table_, ui_, slide_; anything
else counts as a photo).
"""

from __future__ import annotations

QUESTIONS: dict[str, list[str]] = {
    "photo": [
        "What is in this image?",
        "Describe this picture in detail.",
        "What colours stand out in this photo?",
        "Write a one-sentence caption for this image.",
        "Is there any text visible in the image? If so, what does it say?",
    ],
    "doc": [
        "Summarize this document in two sentences.",
        "What is the title of this document?",
        "What is the total amount on this page?",
        "List the main points of this text.",
    ],
    "chart": [
        "What does this chart show?",
        "Which category has the highest value?",
        "Describe the trend in this chart.",
        "What are the axis labels?",
    ],
    "table": [
        "What does this table contain?",
        "Which row has the largest number?",
        "Read the first row of the table.",
    ],
    "ui": [
        "What application is shown in this screenshot?",
        "Which buttons or settings can you see?",
        "Describe the layout of this screen.",
    ],
    "slide": [
        "What is this slide about?",
        "Read the bullet points on this slide.",
    ],
}

# System prompts for some conversations (the chat template renders them as a "System:" turn).
SYSTEM: list[str] = [
    "You are a helpful assistant that answers briefly.",
    "Answer in one short paragraph.",
]

# (earlier assistant answer, follow-up question): multi-turn conversations about one image.
FOLLOW_UPS: list[tuple[str, str]] = [
    ("There is a lot of detail here.", "Which part of the image is the most important?"),
    ("Thanks, that helps.", "Can you describe the background as well?"),
]

# Text-only conversations as (role, text) turns.
TEXT_ONLY: list[list[tuple[str, str]]] = [
    [("user", "Hello! What can you do?")],
    [("user", "Explain what a neural processing unit is in simple terms.")],
    [("system", "You are a helpful assistant that answers briefly."), ("user", "What is the capital of France?")],
    [("user", "Write a short poem about the sea.")],
    [
        ("user", "How many days are there in a leap year?"),
        ("assistant", "A leap year has 366 days."),
        ("user", "And how many weeks is that?"),
    ],
    [("user", "Translate 'good morning' into Spanish and German.")],
    [("user", "List three tips for taking better photos with a phone.")],
    [("user", "What is 17 times 23?")],
    [("user", "Summarize the plot of a detective story in two sentences.\n\nKeep it simple.")],
    [("user", "Give me a Python one-liner that reverses a string.")],
]
