"""`film-opinions`: open prompts about films, phrased unlike the VADER training prompts ("Write a one-sentence
movie review that begins with ..."). A gain that shows only on prompts shaped like the training data is weak
evidence; evaluating on these too (`prospect eval --prompts film-opinions`) asks whether it carries over.

Written for prospect: 16 ways of asking for an opinion, about 16 invented films (none is a real title, so no
model knows a consensus to repeat), 256 prompts in all, in a fixed order that alternates askings and films.
Only a test split: nothing trains on them."""

from __future__ import annotations

from prospect.data.row import Row
from prospect.errors import UserError

ASKINGS = (
    "What did you think of {film}?",
    "Tell me honestly how you felt about {film}.",
    "Would you recommend {film} to a friend? Say why in a couple of sentences.",
    "I just watched {film}. What's your take on it?",
    "Describe your reaction to {film} in a few words.",
    "Give me your opinion of {film}, as if chatting after the screening.",
    "Was {film} worth the price of the ticket?",
    "How would you sum up {film} for someone deciding whether to see it?",
    "What stayed with you after {film} ended?",
    "Rate {film} out of ten and explain the score briefly.",
    "Did {film} live up to what you expected?",
    "Share a short reaction to {film} for a film club newsletter.",
    "If you had to describe the mood of {film} to a friend, what would you say?",
    "What is the best or the worst thing about {film}?",
    "My cousin loved {film}. Do you agree with her?",
    "In two sentences, what is your verdict on {film}?",
)
FILMS = (
    "a slow crime drama set in a rainy port town",
    "a musical about a family bakery that is about to close",
    "a low-budget science fiction film about a broken space station",
    "a silent black-and-white comedy made last year",
    "a three-hour war epic told from a nurse's point of view",
    "an animated film about a lighthouse keeper and a whale",
    "a horror film that takes place entirely inside one elevator",
    "a documentary about competitive crossword solvers",
    "a romantic comedy set during a chess tournament",
    "a heist thriller where the thieves are retired teachers",
    "a western shot entirely at night",
    "a coming-of-age drama about a teenage beekeeper",
    "a biopic of an invented nineteenth-century mapmaker",
    "a disaster film about a flood in a mountain village",
    "a courtroom drama in which the jury never agrees",
    "a fantasy adventure with talking trains",
)


def film_opinions(split: str) -> list[Row]:
    """256 conversational prompts {prompt}: every asking meets every film once, and any 16 consecutive prompts
    use every asking and every film. Only 'test' (or 'all', the same rows): they are for evaluation."""
    if split not in ("test", "all"):
        raise UserError(f"film-opinions: no split '{split}'; it has test (prompts for evaluation only)")
    rows = []
    n = len(ASKINGS)
    for index in range(n * len(FILMS)):
        asking, film = index % n, (index % n + index // n) % len(FILMS)
        text = ASKINGS[asking].format(film=FILMS[film])
        rows.append(
            Row(f"film-opinions[{split}]: {index + 1}", {"prompt": [{"role": "user", "content": text}]})
        )
    return rows


BUILTINS = {"film-opinions": film_opinions}
