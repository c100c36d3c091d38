"""How the `constraints` stage words each verifiable constraint in an instruction (data only).

Every entry is a list of ``str.format`` templates, or a dict from a variant (the constraint's
comparison: ``"less than"`` / ``"at least"``) to such a list. Templates see the constraint's
kwargs plus a few display fields that generator/constraints.py derives (`_view`):

- ``{the_words}`` / ``{the_words_or}``: 'the word "x"' or 'the words "x" and "y"' / '... "x" or "y"'
- ``{tail}``: the last words of the request that combination:repeat_prompt asks to repeat
- ``{example}``: the first section heading, e.g. ``SECTION 1``

Each sentence states what the checker verifies, in our own words: the exact markers ("***"
between paragraphs, "* " bullets, *highlights*, <<title>>, "P.S.", "SECTION 1"), exact counts and
the exact end phrase. "fewer than N" always means what the checker means by "less than N".
A template with literal braces must double them (``{{`` and ``}}``).
"""
from __future__ import annotations

LESS, AT_LEAST = "less than", "at least"

PHRASINGS: dict[str, list[str] | dict[str, list[str]]] = {
    "keywords:existence": [
        "Make sure {the_words} appear somewhere in your answer.",
        "Your reply has to mention {the_words}.",
        "Work {the_words} into your response.",
        "Use {the_words} at least once each.",
    ],
    "keywords:frequency": {
        AT_LEAST: [
            'Use the word "{keyword}" at least {frequency} times.',
            'The word "{keyword}" should come up {frequency} or more times in your answer.',
            'Mention "{keyword}" no fewer than {frequency} times.',
        ],
        LESS: [
            'Use the word "{keyword}" fewer than {frequency} times in total.',
            'Keep "{keyword}" to less than {frequency} occurrences; longer words that contain it count too.',
            'The word "{keyword}" may appear, but fewer than {frequency} times.',
        ],
    },
    "keywords:forbidden_words": [
        "Do not use {the_words_or} anywhere in your answer.",
        "Avoid {the_words_or} completely, in any capitalisation.",
        "Your reply must not contain {the_words_or}.",
        "Write the answer without ever using {the_words_or}.",
    ],
    "keywords:letter_frequency": {
        AT_LEAST: [
            'The letter "{letter}" must appear at least {let_frequency} times in your answer.',
            'Use the letter "{letter}" {let_frequency} or more times (capital and small letters both count).',
            'Make sure your reply contains the letter "{letter}" no fewer than {let_frequency} times.',
        ],
        LESS: [
            'Use the letter "{letter}" fewer than {let_frequency} times, counting capital and small forms.',
            'The letter "{letter}" may appear less than {let_frequency} times in the whole answer.',
            'Keep the letter "{letter}" rare: fewer than {let_frequency} occurrences in total.',
        ],
    },
    "length_constraints:number_sentences": {
        AT_LEAST: [
            "Write at least {num_sentences} sentences.",
            "Your answer needs {num_sentences} or more sentences.",
            "Use no fewer than {num_sentences} full sentences.",
        ],
        LESS: [
            "Answer in fewer than {num_sentences} sentences.",
            "Keep your reply under {num_sentences} sentences.",
            "Use less than {num_sentences} sentences in total.",
        ],
    },
    "length_constraints:number_paragraphs": [
        "Write exactly {num_paragraphs} paragraphs and put the markdown divider *** on its own line "
        "between each pair of paragraphs.",
        "Your answer must have {num_paragraphs} paragraphs, separated from each other by ***.",
        "Split the answer into exactly {num_paragraphs} paragraphs; mark each break between them with ***.",
    ],
    "length_constraints:number_words": {
        AT_LEAST: [
            "Write at least {num_words} words.",
            "Your answer should run to {num_words} words or more.",
            "Use no fewer than {num_words} words.",
        ],
        LESS: [
            "Answer in fewer than {num_words} words.",
            "Keep the whole reply under {num_words} words.",
            "Use less than {num_words} words in total.",
        ],
    },
    "detectable_content:number_placeholders": [
        "Include at least {num_placeholders} placeholders in square brackets, such as [name].",
        "Leave {num_placeholders} or more blanks for the reader to fill in, each written in square "
        "brackets like [date].",
        "Your answer must contain no fewer than {num_placeholders} bracketed placeholders, for "
        "example [city].",
    ],
    "detectable_content:postscript": [
        'After the main answer, add a postscript that begins with "{postscript_marker}".',
        'Close with a short note starting with "{postscript_marker}".',
        'End with a postscript; start it with the marker "{postscript_marker}".',
    ],
    "detectable_format:number_bullet_lists": [
        'Include exactly {num_bullets} bullet points in markdown, each on its own line starting with '
        '"* ", and begin no other line with a single "*" or with "-".',
        'Give exactly {num_bullets} markdown bullet points ("* " at the start of each line); no other '
        'list items.',
        'Your answer must contain {num_bullets} bullet points, no more and no fewer, written as lines '
        'that begin with "* ".',
    ],
    "detectable_format:number_highlighted_sections": [
        "Highlight at least {num_highlights} parts of your answer with markdown, like *this part*.",
        "Mark {num_highlights} or more key phrases by wrapping each in single asterisks, as in "
        "*key phrase*.",
        "Emphasise no fewer than {num_highlights} passages with asterisks, for example *an important point*.",
    ],
    "detectable_format:multiple_sections": [
        'Organise your answer into {num_sections} sections. Start each one with a heading line '
        '"{section_spliter} N", numbering from 1 ({example}, then {section_spliter} 2, and so on).',
        'Divide the reply into {num_sections} numbered sections, each opened by "{section_spliter}" '
        'and its number, starting with {example}.',
        'Use {num_sections} sections; begin every section with the exact label {section_spliter} '
        'followed by its number (e.g. {example}).',
    ],
    "detectable_format:json_format": [
        "Format your entire answer as valid JSON, with no text outside it; a ```json code block is fine.",
        "Reply only with well-formed JSON (optionally inside a ``` fence) and nothing else.",
        "Your whole output must parse as JSON; put no explanation before or after it.",
    ],
    "detectable_format:title": [
        "Give your answer a title wrapped in double angle brackets, such as <<A Short Title>>.",
        "Start with a title inside double angular brackets, like <<My Title>>.",
        "Include a title written between << and >>, for example <<Notes on the Topic>>.",
    ],
    "combination:repeat_prompt": [
        'First repeat the request word for word (everything from the start of this message up to '
        '"{tail}", without these added rules), then give your answer. Write nothing before the '
        'repeated request.',
        "Begin your reply by copying the request above word for word, leaving out these extra "
        "instructions, and then answer it. Do not put any words before the copy.",
        "Open with a word-for-word copy of the task (only the task itself, which ends with "
        '"{tail}"), then respond to it.',
    ],
    "startend:end_checker": [
        'End your answer with the exact phrase "{end_phrase}" and write nothing after it.',
        'Finish with these exact words: "{end_phrase}". Nothing may follow them.',
        'The last words of your reply must be "{end_phrase}", exactly as written here.',
    ],
    "startend:quotation": [
        'Wrap your whole answer in double quotation marks, so it begins and ends with ".',
        "Put your entire reply inside one pair of double quotes.",
        'Enclose the complete response in double quotation marks: the first and last characters '
        'must both be ".',
    ],
    "change_case:english_lowercase": [
        "Write your entire answer in English, using lowercase letters only; no capital letters at all.",
        "Reply in English without a single capital letter.",
        "Use only small letters, in English, for the whole response.",
    ],
    "change_case:english_capital": [
        "Write your entire answer in English and in capital letters only.",
        "Reply in English, all in uppercase.",
        "Use nothing but CAPITAL LETTERS, in English, for the whole response.",
    ],
    "change_case:capital_word_frequency": {
        AT_LEAST: [
            "Write at least {capital_frequency} words entirely in capital letters.",
            "Put {capital_frequency} or more words in ALL CAPS for emphasis.",
            "Your answer must contain no fewer than {capital_frequency} fully capitalised words.",
        ],
        LESS: [
            'Use fewer than {capital_frequency} words written entirely in capitals (the word "I" '
            'counts as one).',
            "Keep fully capitalised words, such as acronyms, to less than {capital_frequency}.",
            'Write fewer than {capital_frequency} all-caps words in total; note that "I" is one.',
        ],
    },
    "punctuation:no_comma": [
        "Do not use any commas in your answer.",
        "Write the whole reply without a single comma.",
        "Avoid commas entirely.",
    ],
}
