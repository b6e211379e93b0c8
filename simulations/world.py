"""The synthetic cross-platform world (the default scenario) and the ``fedrec world`` command.

Owns: ``WorldConfig``, ``generate_world`` (pure, seeded: one seed gives byte-identical output),
and the command that writes a scenario (synthetic or MovieLens) to disk with
:func:`fedrec.shared.datasets.write_dataset`.

Generative model, in brief (the ground truth is written apart, under ``ground_truth/``):

- ``K`` shared latent interests. Every item has a primary interest (and with probability
  ``secondary_share`` a secondary one), a channel-specific type and natural-language text built
  from templates, interest vocabulary and shared distractor words (brands, adjectives, price
  tiers), so item text relates items of different channels, noisily.
- Item popularity is Zipf-like (Zipf–Mandelbrot): ``popularity = 1 / (rank + q)`` with
  ``q = popularity_offset * items``, ranking a latent score that is partly random and partly
  visible in the text (a "bestseller"/"trending" badge raises it).
- A person has interests ``θ ~ Dirichlet(dirichlet_alpha)`` (2–3 dominate) and is present on a
  set of channels; a share ``overlap`` of people is on two or more.
- A person's sequence on a channel is a Markov chain over interests: stay with probability
  ``stay``; otherwise follow a global, latent interest-transition matrix ``T`` (shared by all
  channels, not visible in text) with probability ``follow_transition``, or draw from ``θ``.
  Each step picks an unseen item of the current interest with probability
  ``∝ popularity ** popularity_exponent``. So the next item depends on the recent interest,
  on learnable transitions and on popularity: neither popularity nor text similarity to the
  history is enough.

Must not: hold training logic the apps need, or import ``fedrec.server``/``fedrec.client``.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from fedrec.shared.config import ConfigError
from fedrec.shared.data import Catalogue, Interactions

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Vocabulary: interests, and the words each channel kind uses for them.

FINANCE_TYPES = ("credit card", "loan", "fund", "insurance", "savings")


@dataclass(frozen=True)
class Interest:
    """One latent interest and its vocabulary in each channel kind."""

    name: str
    words: tuple[str, ...]  # topic words: descriptions, social items, search queries
    products: tuple[tuple[str, str], ...]  # ecommerce: (product, department)
    finance: tuple[tuple[str, str], ...]  # finance: (type from FINANCE_TYPES, product name)
    groups: tuple[str, ...]  # social: community names


# fmt: off
INTERESTS: tuple[Interest, ...] = (
    Interest(
        "travel",
        ("travel", "flights", "weekend getaways", "backpacking", "road trips", "city breaks",
         "beach holidays", "hotels", "adventure trips", "packing light"),
        (("carry-on suitcase", "Luggage & Bags"), ("travel backpack", "Luggage & Bags"),
         ("neck pillow", "Accessories"), ("packing cubes", "Luggage & Bags"),
         ("passport wallet", "Accessories"), ("universal travel adapter", "Electronics"),
         ("luggage scale", "Accessories")),
        (("credit card", "Travel Rewards Credit Card"), ("credit card", "Air Miles Card"),
         ("credit card", "No Foreign Fee Card"), ("insurance", "Annual Travel Insurance"),
         ("insurance", "Trip Cancellation Cover"), ("savings", "Holiday Savings Pot")),
        ("Weekend Getaway Planners", "Solo Backpackers", "Budget Travellers", "Road Trippers"),
    ),
    Interest(
        "fitness",
        ("workouts", "running", "strength training", "the gym", "yoga", "cardio", "marathons",
         "stretching", "healthy habits", "cycling"),
        (("yoga mat", "Sports & Outdoors"), ("adjustable dumbbells", "Sports & Outdoors"),
         ("running shoes", "Shoes"), ("protein powder", "Health"),
         ("fitness tracker", "Electronics"), ("resistance bands", "Sports & Outdoors"),
         ("foam roller", "Sports & Outdoors")),
        (("credit card", "Active Cashback Card"), ("insurance", "Active Lifestyle Health Plan"),
         ("insurance", "Sports Injury Cover"), ("savings", "Race Day Saver")),
        ("Morning Runners", "Home Workout Crew", "Yoga Beginners", "Lifting Partners"),
    ),
    Interest(
        "investing",
        ("stocks", "index funds", "dividends", "portfolios", "long-term returns", "ETFs",
         "compound interest", "retirement planning", "market news", "wealth building"),
        (("investing for beginners book", "Books"), ("financial planner notebook", "Stationery"),
         ("financial calculator", "Electronics"), ("stock market board game", "Toys & Games"),
         ("dual monitor stand", "Office")),
        (("fund", "Global Equity Index Fund"), ("fund", "Dividend Growth Fund"),
         ("fund", "Sustainable ESG Fund"), ("fund", "Emerging Markets Fund"),
         ("fund", "Bond Income Fund"), ("savings", "Stocks and Shares ISA"),
         ("savings", "Retirement Savings Plan")),
        ("Dividend Investors", "Index Fund Fans", "Early Retirement Planners", "Stock Pickers"),
    ),
    Interest(
        "parenting",
        ("babies", "toddlers", "kids", "family life", "the school run", "bedtime routines",
         "the nursery", "newborns", "playtime", "raising children"),
        (("baby stroller", "Baby"), ("car seat", "Baby"), ("baby monitor", "Electronics"),
         ("diaper bag", "Baby"), ("high chair", "Baby"), ("kids' lunchbox", "Kitchen"),
         ("nursery night light", "Home")),
        (("insurance", "Family Life Insurance"), ("insurance", "Child Health Cover"),
         ("savings", "Junior Savings Account"), ("loan", "Family Car Loan"),
         ("fund", "Child Trust Fund")),
        ("New Parents Circle", "Toddler Talk", "School Run Parents", "Dads Together"),
    ),
    Interest(
        "cooking",
        ("recipes", "baking", "meal prep", "home cooking", "weeknight dinners", "sourdough",
         "spices", "vegetarian food", "the kitchen", "fresh ingredients"),
        (("cast iron skillet", "Kitchen"), ("chef's knife", "Kitchen"), ("stand mixer", "Kitchen"),
         ("air fryer", "Appliances"), ("spice rack", "Kitchen"), ("baking sheet", "Kitchen"),
         ("recipe book", "Books")),
        (("credit card", "Grocery Cashback Card"), ("credit card", "Dining Rewards Card"),
         ("loan", "Kitchen Renovation Loan")),
        ("Sourdough Bakers", "Weeknight Dinner Ideas", "Meal Prep Sunday", "Spice Lovers"),
    ),
    Interest(
        "gaming",
        ("video games", "consoles", "esports", "multiplayer", "game streaming", "RPGs",
         "controllers", "gaming setups", "speedruns", "indie games"),
        (("wireless controller", "Video Games"), ("gaming headset", "Electronics"),
         ("mechanical keyboard", "Electronics"), ("gaming chair", "Office"),
         ("console stand", "Video Games"), ("capture card", "Electronics")),
        (("credit card", "Gamer Rewards Card"), ("credit card", "Streaming Cashback Card"),
         ("loan", "Gaming PC Finance")),
        ("Indie Game Club", "Esports Fans", "Retro Gamers", "Co-op Night Squad"),
    ),
    Interest(
        "music",
        ("music", "concerts", "guitar", "vinyl", "playlists", "festivals", "songwriting",
         "live gigs", "bands", "music production"),
        (("acoustic guitar", "Musical Instruments"), ("record player", "Electronics"),
         ("studio headphones", "Electronics"), ("bluetooth speaker", "Electronics"),
         ("digital piano", "Musical Instruments"), ("guitar strings", "Musical Instruments")),
        (("credit card", "Concert Presale Card"), ("insurance", "Musical Instrument Insurance"),
         ("loan", "Instrument Purchase Loan"), ("savings", "Festival Savings Pot")),
        ("Vinyl Collectors", "Bedroom Producers", "Festival Goers", "Guitar Learners"),
    ),
    Interest(
        "pets",
        ("dogs", "cats", "puppies", "pet care", "vet visits", "dog walks", "grooming", "pet food",
         "adoption", "training treats"),
        (("dog bed", "Pet Supplies"), ("cat scratching post", "Pet Supplies"),
         ("pet carrier", "Pet Supplies"), ("automatic feeder", "Pet Supplies"),
         ("dog leash", "Pet Supplies"), ("grooming brush", "Pet Supplies"),
         ("chew toys", "Pet Supplies")),
        (("insurance", "Pet Health Insurance"), ("insurance", "Lifetime Dog and Cat Cover"),
         ("credit card", "Pet Store Rewards Card"), ("savings", "Vet Bills Savings Pot")),
        ("Dog Walkers Meetup", "Cat People", "Rescue Pet Owners", "Puppy Training Help"),
    ),
    Interest(
        "home_garden",
        ("home improvement", "gardening", "DIY", "houseplants", "renovation", "interior design",
         "furniture", "lawn care", "home decor", "vegetable patches"),
        (("cordless drill", "Tools"), ("garden hose", "Garden"), ("raised planter", "Garden"),
         ("floor lamp", "Home"), ("throw pillows", "Home"), ("patio chairs", "Garden"),
         ("pruning shears", "Garden")),
        (("loan", "Home Improvement Loan"), ("loan", "Fixed Rate Mortgage"),
         ("loan", "Green Home Loan"), ("insurance", "Home Contents Insurance"),
         ("insurance", "Buildings Insurance"), ("savings", "House Deposit Saver")),
        ("Houseplant Swap", "DIY Fixers", "Allotment Growers", "Small Space Decor"),
    ),
    Interest(
        "fashion",
        ("fashion", "style", "outfits", "sneakers", "streetwear", "seasonal trends",
         "wardrobe basics", "accessories", "designer labels", "vintage clothing"),
        (("leather jacket", "Clothing"), ("denim jeans", "Clothing"), ("white sneakers", "Shoes"),
         ("silk scarf", "Accessories"), ("wristwatch", "Accessories"),
         ("tote bag", "Luggage & Bags"), ("wool coat", "Clothing"), ("sunglasses", "Accessories")),
        (("credit card", "Fashion Store Credit Card"), ("credit card", "Pay Later Card"),
         ("insurance", "Jewellery and Watch Insurance")),
        ("Street Style Spotters", "Capsule Wardrobe", "Vintage Finds", "Sneakerheads"),
    ),
    Interest(
        "technology",
        ("technology", "gadgets", "smartphones", "laptops", "smart homes", "AI", "coding",
         "software", "tech reviews", "cloud computing"),
        (("laptop", "Computers"), ("smartphone", "Electronics"),
         ("wireless earbuds", "Electronics"), ("smart speaker", "Electronics"),
         ("USB-C hub", "Computers"), ("tablet", "Computers"), ("portable SSD", "Computers")),
        (("insurance", "Phone and Gadget Insurance"), ("loan", "Laptop Finance Plan"),
         ("credit card", "Tech Cashback Card"), ("fund", "Technology Innovation Fund")),
        ("Smart Home Tinkerers", "Open Source Hackers", "Gadget Reviewers", "AI Curious"),
    ),
    Interest(
        "education_career",
        ("online courses", "career growth", "job interviews", "certifications", "university",
         "language learning", "new skills", "productivity", "exam prep", "mentoring"),
        (("desk planner", "Stationery"), ("language course book", "Books"),
         ("ergonomic office chair", "Office"), ("fountain pen", "Stationery"),
         ("study desk lamp", "Home"), ("exam flashcards", "Books")),
        (("loan", "Student Loan"), ("loan", "Career Development Loan"),
         ("savings", "Education Savings Plan"), ("credit card", "Student Credit Card"),
         ("insurance", "Income Protection Insurance")),
        ("Career Changers", "Language Exchange", "Exam Study Group", "Graduate Job Seekers"),
    ),
)
# fmt: on
INTEREST_NAMES = tuple(i.name for i in INTERESTS)

# Designed transitions: interest → (strong successor, weaker successor). Deliberately *not*
# textual (fitness → cooking, travel → investing …): a model has to learn them from sequences.
_TRANSITIONS = {
    "travel": ("investing", "pets"),
    "fitness": ("cooking", "music"),
    "investing": ("home_garden", "travel"),
    "parenting": ("education_career", "pets"),
    "cooking": ("parenting", "gaming"),
    "gaming": ("fashion", "cooking"),
    "music": ("fitness", "technology"),
    "pets": ("home_garden", "travel"),
    "home_garden": ("fashion", "investing"),
    "fashion": ("music", "parenting"),
    "technology": ("education_career", "fitness"),
    "education_career": ("home_garden", "gaming"),
}

# fmt: off
BRANDS = ("Northpeak", "Aster", "Kestrel", "Lumo", "Brightway", "Oakline", "Verdi", "Solace",
    "Pionix", "Halden", "Maru", "Tessel")
BANKS = ("Harbor Bank", "Crescent Financial", "Meridian", "Summit Credit Union", "Beacon Mutual",
    "Larch and Co", "Northgate Bank", "Fairway Finance")
ADJECTIVES = ("durable", "lightweight", "compact", "classic", "modern", "essential", "eco-friendly",
    "everyday", "smart", "versatile", "handy", "sleek")
TIERS = ("budget", "mid-range", "premium")
NOISE = ("Free delivery.", "Two-year warranty.", "Gift-ready packaging.", "Ships in 24 hours.",
    "Easy returns.")
FIN_FEATURES = {
    "credit card": (
        "0% intro APR for 12 months",
        "No annual fee",
        "Cashback on everyday spending",
        "Contactless and mobile wallet ready",
    ),
    "loan": ("Fixed rate over 1 to 5 years", "Same-day decision", "No early repayment fee"),
    "fund": ("Low annual charge", "Diversified portfolio", "Monthly contributions from 25"),
    "insurance": ("Cover from 5 a month", "24/7 claims line", "Cancel any time"),
    "savings": ("Easy access", "Bonus rate for regular savers", "No minimum deposit"),
}
GROUP_SUFFIX = ("Club", "Community", "Circle", "Network", "Collective")
FIRST_NAMES = ("Maya", "Leo", "Priya", "Sam", "Ines", "Kofi", "Hana", "Tom", "Aisha", "Noah",
    "Lena", "Omar")
LAST_NAMES = ("Chen", "Okafor", "Silva", "Novak", "Haddad", "Kim", "Moreau", "Patel", "Berg",
    "Rossi")
CREATOR_FORMATS = ("videos", "tips", "stories", "livestreams", "guides", "reels")
POST_HOOKS = ("10 things I learned about", "A beginner's guide to", "My honest take on",
    "Why everyone is talking about", "A week of", "Stop overthinking")
# fmt: on
SECONDARY_PHRASES = {
    "ecommerce": ("Also great for", "Popular with fans of", "Pairs well with"),
    "finance": ("Also popular for", "Often chosen alongside"),
    "social": ("Sometimes about", "Also covers"),
}
SOCIAL_TYPES = ("group", "creator", "post")
SOCIAL_EVENTS = {"group": "join", "creator": "follow", "post": "like"}
BADGES = {
    "ecommerce": ("Bestseller.", "Top-rated by customers.", "Customer favourite."),
    "finance": ("Award-winning.", "Most chosen by customers."),
    "social": ("Trending.", "Popular this week."),
}
CHANNEL_KINDS = ("ecommerce", "social", "finance")
# (event, cumulative probability) per kind; social events follow the item type instead.
EVENT_MIX = {
    "ecommerce": (("view", 0.60), ("click", 0.85), ("purchase", 1.0)),
    "finance": (("view", 0.75), ("apply", 1.0)),
}

# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ChannelSpec:
    """One channel of the world. ``kind`` picks the item vocabulary (defaults to ``name``)."""

    name: str
    items: int
    users: int
    mean_length: float
    min_length: int = 3
    max_length: int = 200
    kind: str = ""

    @property
    def item_kind(self) -> str:
        return self.kind or self.name


DEFAULT_CHANNELS = (
    ChannelSpec("ecommerce", items=1200, users=5000, mean_length=20.0),
    ChannelSpec("social", items=900, users=4000, mean_length=12.0),
    ChannelSpec("finance", items=250, users=2000, mean_length=5.0),
)


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and knobs of the synthetic world.

    The defaults keep the channel sizes of the brief (5,000 / 4,000 / 2,000 users) with half of
    the people on two or more channels. That fixes the number of people: 11,000 memberships
    over 7,000 people = 3,500 on one channel, 3,000 on two and 500 on three. (8,000 people
    would need at least 12,000 memberships for ``overlap=0.5``.) ``resized`` changes people
    and overlap consistently.
    """

    seed: int = 0
    people: int = 7000
    overlap: float = 0.5  # share of people present on >= 2 channels
    channels: tuple[ChannelSpec, ...] = DEFAULT_CHANNELS
    popularity_exponent: float = 1.2  # β in P(item | interest) ∝ popularity**β
    popularity_offset: float = 1 / 60  # q / items in popularity = 1 / (rank + q)
    stay: float = 0.55  # P(next interest = current interest)
    follow_transition: float = 0.7  # on a move: follow T, else draw from the person's θ
    dirichlet_alpha: float = 0.15  # θ ~ Dirichlet(α·1): 2-3 dominant interests
    secondary_share: float = 0.3  # items with a secondary interest
    badge_share: float = 0.12  # items whose text carries a popularity badge
    badge_boost: float = 1.5  # badge's effect on the latent popularity score (sd 1)
    query_share: float = 0.2  # ecommerce interactions with a search query
    start: int = 1_700_000_000  # Unix seconds of the earliest possible interaction

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every problem with this configuration, each with the bad value."""
        p: list[str] = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                p.append(message)

        check(self.people >= 1, f"people must be >= 1. Found {self.people}.")
        check(0.0 <= self.overlap <= 1.0, f"overlap must be in [0, 1]. Found {self.overlap}.")
        for name in ("stay", "follow_transition", "secondary_share", "badge_share", "query_share"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"{name} must be in [0, 1]. Found {value}.")
        check(self.stay < 1.0, f"stay must be < 1. Found {self.stay}.")
        check(
            self.popularity_exponent >= 0,
            f"popularity_exponent must be >= 0. Found {self.popularity_exponent}.",
        )
        check(
            self.popularity_offset >= 0,
            f"popularity_offset must be >= 0. Found {self.popularity_offset}.",
        )
        check(
            self.dirichlet_alpha > 0, f"dirichlet_alpha must be > 0. Found {self.dirichlet_alpha}."
        )
        check(self.badge_boost >= 0, f"badge_boost must be >= 0. Found {self.badge_boost}.")
        check(self.start >= 0, f"start must be >= 0. Found {self.start}.")
        check(len(self.channels) >= 1, "channels must not be empty.")
        names = [c.name for c in self.channels]
        check(len(set(names)) == len(names), f"channel names must be unique. Found {names}.")
        k = len(INTERESTS)
        for c in self.channels:
            where = f"channel {c.name!r}"
            check(
                c.name.isidentifier() and c.name == c.name.lower(),
                f"{where}: name must be a lowercase identifier. Found {c.name!r}.",
            )
            check(
                c.item_kind in CHANNEL_KINDS,
                f"{where}: kind must be one of {CHANNEL_KINDS}. Found {c.item_kind!r}.",
            )
            check(
                c.items >= k, f"{where}: items must be >= {k} (one per interest). Found {c.items}."
            )
            check(
                1 <= c.users <= self.people,
                f"{where}: users must be in [1, people={self.people}]. Found {c.users}.",
            )
            check(
                1 <= c.min_length <= c.max_length,
                f"{where}: need 1 <= min_length <= max_length. "
                f"Found {c.min_length}, {c.max_length}.",
            )
            check(
                c.min_length <= c.mean_length <= c.max_length,
                f"{where}: mean_length must be in [min_length, max_length]. Found {c.mean_length}.",
            )
            check(
                c.min_length <= c.items,
                f"{where}: min_length must be <= items. Found {c.min_length} > {c.items}.",
            )
        if not p:
            low, high = self._membership_bounds()
            total = sum(c.users for c in self.channels)
            check(
                low <= total <= high,
                f"overlap={self.overlap} with people={self.people} needs between {low} and "
                f"{high} channel memberships (sum of channel users). Found {total}. "
                f"Use WorldConfig.resized(people=..., overlap=...).",
            )
        return p

    def multi_channel(self) -> int:
        """Number of people on two or more channels."""
        return round(self.overlap * self.people) if len(self.channels) > 1 else 0

    def _membership_bounds(self) -> tuple[int, int]:
        m = self.multi_channel()
        return self.people + m, self.people + (len(self.channels) - 1) * m

    def with_users(self, users: Mapping[str, int]) -> WorldConfig:
        """This config with the named channels' user counts set: a size-skewed world (e.g. a
        small new partner).

        The number of people stays (raised to the largest channel, or to half the memberships,
        if needed) and the overlap follows: every person beyond a single channel is on exactly
        two. (Keeping the overlap instead can ask for people on three channels that a small
        channel cannot hold.)

        Raises:
            ConfigError: an unknown channel, or a count below 1.
        """
        known = [c.name for c in self.channels]
        problems = [
            f"--users names channel {name!r}, which the world does not have (it has {known})."
            for name in users
            if name not in known
        ]
        problems += [
            f"--users {name}={n}: a channel needs at least 1 user."
            for name, n in users.items()
            if n < 1
        ]
        if problems:
            raise ConfigError(problems)
        channels = tuple(
            dataclasses.replace(c, users=users.get(c.name, c.users)) for c in self.channels
        )
        total = sum(c.users for c in channels)
        people = min(max(self.people, -(-total // 2), max(c.users for c in channels)), total)
        overlap = (total - people) / people
        return dataclasses.replace(self, people=people, overlap=overlap, channels=channels)

    def resized(self, *, people: int | None = None, overlap: float | None = None) -> WorldConfig:
        """This config with another number of people and/or overlap, kept consistent.

        People on several channels keep their mean number of channels (15/7 by default).
        ``people`` alone scales every channel's users; ``overlap`` alone keeps the channel
        sizes and changes the number of people; both rescale the channel sizes.
        """
        if people is None and overlap is None:
            return self
        o_new = self.overlap if overlap is None else overlap
        multi = self.multi_channel()
        total = sum(c.users for c in self.channels)
        mean_multi = (total - (self.people - multi)) / multi if multi else 2.0
        spread = 1.0 + o_new * (mean_multi - 1.0)  # memberships per person
        if people is None:
            p_new = max(1, round(total / spread))
            m_total = total
        else:
            p_new = people
            m_total = round(people * spread)
        m_multi = round(o_new * p_new) if len(self.channels) > 1 else 0
        low, high = p_new + m_multi, p_new + (len(self.channels) - 1) * m_multi
        m_total = min(max(m_total, low), high)
        sizes = _apportion(m_total, [c.users for c in self.channels])
        channels = tuple(
            dataclasses.replace(c, users=max(1, min(p_new, n)))
            for c, n in zip(self.channels, sizes, strict=True)
        )
        return dataclasses.replace(self, people=p_new, overlap=o_new, channels=channels)


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - base), kind="stable")
    base[order[: total - int(base.sum())]] += 1
    return [int(x) for x in base]


# ---------------------------------------------------------------------------------------------
# The world


@dataclass(frozen=True)
class World:
    """A generated world: public catalogues, private interactions and the ground truth."""

    config: WorldConfig
    catalogues: dict[str, Catalogue]
    interactions: dict[str, Interactions]
    person_ids: np.ndarray  # (P,) str
    theta: np.ndarray  # (P, K) float64, interest mixture per person
    membership: np.ndarray  # (P, C) bool, person on channel (config order)
    item_interests: dict[str, np.ndarray]  # channel -> (N, 2) int64, [primary, secondary|-1]
    item_types: dict[str, np.ndarray]  # channel -> (N,) str
    popularity: dict[str, np.ndarray]  # channel -> (N,) float64, 1 / (rank + q)
    transition: np.ndarray  # (K, K) float64, T, zero diagonal, rows sum to 1
    interests: tuple[str, ...] = INTEREST_NAMES
    elapsed_s: float = field(default=0.0, compare=False)

    def source(self) -> dict:
        """Provenance for the dataset manifest."""
        return {
            "scenario": "synthetic",
            "generator": "fedrec.simulations.world",
            "generator_version": 1,
            "config": dataclasses.asdict(self.config),
            "ground_truth": sorted(self.ground_truth_files()),
        }

    def ground_truth_files(self) -> dict[str, bytes]:
        """Evaluation-only files: people (θ, channels), items (interests, popularity), T."""
        names = [c.name for c in self.config.channels]
        people = io.StringIO()
        w = csv.writer(people, lineterminator="\n")
        w.writerow(["person_id", "channels", *(f"theta_{k}" for k in self.interests)])
        for pid, member, theta in zip(self.person_ids, self.membership, self.theta, strict=True):
            chans = ";".join(n for n, on in zip(names, member, strict=True) if on)
            w.writerow([pid, chans, *(f"{x:.6f}" for x in theta)])

        items = io.StringIO()
        w = csv.writer(items, lineterminator="\n")
        w.writerow(
            ["channel", "item_id", "type", "primary_interest", "secondary_interest", "popularity"]
        )
        for name in names:
            cat = self.catalogues[name]
            for i, item_id in enumerate(cat.item_ids):
                primary, secondary = self.item_interests[name][i]
                w.writerow(
                    [
                        name,
                        item_id,
                        self.item_types[name][i],
                        self.interests[primary],
                        self.interests[secondary] if secondary >= 0 else "",
                        f"{self.popularity[name][i]:.8f}",
                    ]
                )

        model = {
            "interests": list(self.interests),
            "transition": [[round(float(x), 6) for x in row] for row in self.transition],
            "stay": self.config.stay,
            "follow_transition": self.config.follow_transition,
            "popularity_exponent": self.config.popularity_exponent,
            "dirichlet_alpha": self.config.dirichlet_alpha,
            "channels": names,
            "people": int(len(self.person_ids)),
            "people_on_several_channels": int((self.membership.sum(axis=1) >= 2).sum()),
        }
        return {
            "ground_truth/people.csv": people.getvalue().encode(),
            "ground_truth/items.csv": items.getvalue().encode(),
            "ground_truth/model.json": (json.dumps(model, indent=2) + "\n").encode(),
        }


def _transition_matrix(rng: np.random.Generator) -> np.ndarray:
    """T: 0.5 / 0.3 on the designed successors, 0.2 spread at random over the others."""
    k = len(INTERESTS)
    t = np.zeros((k, k))
    for a, (b1, b2) in _TRANSITIONS.items():
        i = INTEREST_NAMES.index(a)
        noise = rng.dirichlet(np.ones(k - 1))
        t[i, np.arange(k) != i] = 0.2 * noise
        t[i, INTEREST_NAMES.index(b1)] += 0.5
        t[i, INTEREST_NAMES.index(b2)] += 0.3
    return t / t.sum(axis=1, keepdims=True)


def _title(text: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))


def _items(spec: ChannelSpec, cfg: WorldConfig, rng: np.random.Generator) -> dict[str, list]:
    """Interests, types, text and popularity of one channel's items."""
    n, k = spec.items, len(INTERESTS)
    kind = spec.item_kind
    base = max(1, min(n // k, max(2, n // (3 * k))))
    counts = np.full(k, base) + rng.multinomial(n - base * k, rng.dirichlet(np.full(k, 4.0)))
    primary = rng.permutation(np.repeat(np.arange(k), counts))
    secondary = np.full(n, -1, dtype=np.int64)
    has_secondary = rng.random(n) < cfg.secondary_share
    offset = rng.integers(1, k, size=n)
    secondary[has_secondary] = (primary[has_secondary] + offset[has_secondary]) % k
    badge = rng.random(n) < cfg.badge_share
    score = rng.standard_normal(n) + cfg.badge_boost * badge
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-score, kind="stable")] = np.arange(1, n + 1)
    popularity = 1.0 / (rank + cfg.popularity_offset * n)  # Zipf–Mandelbrot

    def pick(options):
        return options[int(rng.integers(len(options)))]

    out: dict[str, list] = {k_: [] for k_ in ("title", "desc", "category", "attrs", "type")}
    for i in range(n):
        interest = INTERESTS[primary[i]]
        w1, w2, w3 = (interest.words[j] for j in rng.choice(len(interest.words), 3, replace=False))
        tier, adj = pick(TIERS), pick(ADJECTIVES)
        extra = ""
        if secondary[i] >= 0:
            extra = f" {pick(SECONDARY_PHRASES[kind])} {pick(INTERESTS[secondary[i]].words)}."
        badge_text = f" {pick(BADGES[kind])}" if badge[i] else ""
        if kind == "ecommerce":
            product, department = pick(interest.products)
            brand = pick(BRANDS)
            title = f"{brand} {_title(adj)} {_title(product)}"
            desc = pick(
                (
                    f"{adj.capitalize()} {product} for {w1} and {w2}.",
                    f"A {tier} {product} made for {w1}.",
                    f"The {product} for anyone into {w1}: {adj}, {pick(ADJECTIVES)} and {tier}.",
                )
            )
            desc += extra + badge_text + (" " + pick(NOISE) if rng.random() < 0.5 else "")
            attrs = f"brand={brand}; tier={tier}"
            category, item_type = department, "product"
        elif kind == "finance":
            item_type, name = pick(interest.finance)
            bank = pick(BANKS)
            title = f"{bank} {name}"
            desc = pick(
                (
                    f"A {tier} {item_type} for {w1}. {pick(FIN_FEATURES[item_type])}.",
                    f"{pick(FIN_FEATURES[item_type])}. Made for people into {w1} and {w2}.",
                )
            )
            desc += extra + badge_text
            attrs = f"type={item_type}; tier={tier}; provider={bank}"
            category = item_type.capitalize()
        else:  # social
            item_type = SOCIAL_TYPES[int(rng.choice(3, p=(0.3, 0.3, 0.4)))]
            if item_type == "group":
                title = f"{pick(interest.groups)} {pick(GROUP_SUFFIX)}"
                size = pick(("small", "friendly", "busy", "local", "global"))
                desc = f"A {size} community for people into {w1}, {w2} and {w3}."
            elif item_type == "creator":
                person = f"{pick(FIRST_NAMES)} {pick(LAST_NAMES)}"
                title = f"{person} on {w1}"
                desc = f"{person} shares {w1} and {w2} {pick(CREATOR_FORMATS)} every week."
            else:
                title = f"{pick(POST_HOOKS)} {w1}"
                desc = f"A {adj} post about {w1} and {w2}."
            desc += extra + badge_text
            attrs = f"type={item_type}"
            category = item_type.capitalize()
        if badge[i]:
            attrs += (
                "; badge="
                + {"ecommerce": "bestseller", "finance": "award", "social": "trending"}[kind]
            )
        out["title"].append(title)
        # Catalogue.texts() joins the fields with ". ", so no field ends with a period
        out["desc"].append(desc.rstrip(". "))
        out["category"].append(category)
        out["attrs"].append(attrs)
        out["type"].append(item_type)
    out["primary"] = primary.tolist()
    out["secondary"] = secondary.tolist()
    out["popularity"] = popularity.tolist()
    return out


def _gale_ryser(caps: list[int], people_by_degree: dict[int, int]) -> bool:
    """Can people with these channel counts fill these channel capacities exactly, each
    person on distinct channels? (Gale–Ryser theorem for bipartite degree sequences.)"""
    if sum(caps) != sum(d * c for d, c in people_by_degree.items()):
        return False
    acc = 0
    for j, cap in enumerate(sorted(caps, reverse=True), start=1):
        acc += cap
        if acc > sum(c * min(d, j) for d, c in people_by_degree.items()):
            return False
    return True


def _memberships(cfg: WorldConfig, rng: np.random.Generator) -> np.ndarray:
    """(P, C) bool: exactly ``users`` people per channel, ``overlap`` of people on >= 2."""
    people, n_ch = cfg.people, len(cfg.channels)
    multi = cfg.multi_channel()
    extra = sum(c.users for c in cfg.channels) - cfg.people - multi  # channels beyond 2 each
    degree = np.ones(people, dtype=np.int64)
    if multi:
        degree[:multi] = 2 + extra // multi
        degree[: extra % multi] += 1
    degree = rng.permutation(degree)
    remaining: dict[int, int] = {}
    for d in degree.tolist():
        remaining[d] = remaining.get(d, 0) + 1
    caps = [c.users for c in cfg.channels]
    out = np.zeros((people, n_ch), dtype=bool)
    subsets = {d: list(itertools.combinations(range(n_ch), d)) for d in remaining}
    for person, d in enumerate(degree.tolist()):
        remaining[d] -= 1
        options = list(subsets[d])
        while True:
            weights = np.array([math.prod(caps[c] for c in s) for s in options], dtype=np.float64)
            if weights.sum() <= 0:
                raise RuntimeError("membership assignment failed (config validated as feasible)")
            chosen = options[int(rng.choice(len(options), p=weights / weights.sum()))]
            after = [cap - (c in chosen) for c, cap in enumerate(caps)]
            if _gale_ryser(after, remaining):
                break
            options.remove(chosen)
        caps = after
        out[person, list(chosen)] = True
    return out


def _sequences(
    spec: ChannelSpec,
    cfg: WorldConfig,
    rng: np.random.Generator,
    people: np.ndarray,
    person_ids: np.ndarray,
    theta: np.ndarray,
    transition: np.ndarray,
    items: dict[str, list],
) -> Interactions:
    """Interest-Markov sequences of the channel's people (see the module docstring)."""
    k = len(INTERESTS)
    n_items = spec.items
    weight = np.asarray(items["popularity"]) ** cfg.popularity_exponent
    pools: list[tuple[list[int], list[float]]] = []
    primary = np.asarray(items["primary"])
    secondary = np.asarray(items["secondary"])
    for z in range(k):
        in_pool = np.flatnonzero((primary == z) | (secondary == z))
        w = weight[in_pool] * np.where(primary[in_pool] == z, 1.0, 0.5)
        pools.append((in_pool.tolist(), list(itertools.accumulate(w.tolist()))))
    everything = (list(range(n_items)), list(itertools.accumulate(weight.tolist())))
    t_cum = [list(itertools.accumulate(row)) for row in transition.tolist()]
    kind = spec.item_kind
    events_mix = EVENT_MIX.get(kind)
    item_types = items["type"]
    words = [i.words for i in INTERESTS]
    products = [[p for p, _ in i.products] for i in INTERESTS]

    mu = spec.mean_length - spec.min_length
    if mu > 0:
        lengths = spec.min_length + rng.negative_binomial(2, 2.0 / (2.0 + mu), size=len(people))
    else:
        lengths = np.full(len(people), spec.min_length)
    lengths = np.minimum(lengths, min(spec.max_length, n_items))
    starts = cfg.start + rng.integers(0, 365 * 86400, size=len(people))

    users: list[str] = []
    chosen: list[int] = []
    stamps: list[int] = []
    events: list[str] = []
    queries: list[str] = []
    stay, follow = cfg.stay, cfg.follow_transition
    for p, length, t in zip(people.tolist(), lengths.tolist(), starts.tolist(), strict=True):
        theta_cum = list(itertools.accumulate(theta[p].tolist()))
        draws = rng.random((length, 6)).tolist()
        gaps = rng.standard_exponential(length).tolist()
        seen: set[int] = set()
        z = min(bisect.bisect_right(theta_cum, draws[0][2] * theta_cum[-1]), k - 1)
        for step, (r_stay, r_follow, r_next, r_item, r_event, r_query) in enumerate(draws):
            moved = False
            if step and r_stay >= stay:
                cum = t_cum[z] if r_follow < follow else theta_cum
                z_new = min(bisect.bisect_right(cum, r_next * cum[-1]), k - 1)
                moved = z_new != z
                z = z_new
            members, cum = pools[z]
            item = _draw_unseen(members, cum, r_item, seen, rng)
            if item is None:  # every item of the interest seen: any unseen item of the channel
                item = _draw_unseen(*everything, r_item, seen, rng)
                assert item is not None  # lengths <= items, so one is always left
            seen.add(item)
            t += (3600 + int(gaps[step] * 172800)) if moved else (60 + int(gaps[step] * 1800))
            users.append(person_ids[p])
            chosen.append(item)
            stamps.append(t)
            if events_mix is None:
                events.append(SOCIAL_EVENTS[item_types[item]])
            else:
                events.append(next(e for e, c in events_mix if r_event < c))
            query = ""
            if kind == "ecommerce" and r_query < cfg.query_share:
                query = _query(
                    r_query / cfg.query_share, words[primary[item]], products[primary[item]]
                )
            queries.append(query)
    return Interactions(
        channel=spec.name,
        user_ids=np.array(users, dtype=str),
        item_index=np.array(chosen, dtype=np.int64),
        timestamps=np.array(stamps, dtype=np.int64),
        events=np.array(events, dtype=str),
        queries=np.array(queries, dtype=str),
    )


def _draw_unseen(
    members: list[int], cum: list[float], r: float, seen: set[int], rng: np.random.Generator
) -> int | None:
    """An item of the pool ∝ weight that is not in ``seen``; None when all of them are."""
    for _ in range(8):
        item = members[min(bisect.bisect_right(cum, r * cum[-1]), len(members) - 1)]
        if item not in seen:
            return item
        r = float(rng.random())
    fresh = [
        (m, c - (cum[j - 1] if j else 0.0))
        for j, (m, c) in enumerate(zip(members, cum, strict=True))
        if m not in seen
    ]
    if not fresh:
        return None
    x = r * sum(w for _, w in fresh)
    for m, w in fresh:
        x -= w
        if x <= 0:
            return m
    return fresh[-1][0]


def _query(r: float, words: tuple[str, ...], products: list[str]) -> str:
    """A short search query from an interest's words (``r`` uniform in [0, 1))."""
    word = words[int(r * 997) % len(words)]
    product = products[int(r * 7919) % len(products)]
    form = int(r * 4)
    if form == 0:
        return word
    if form == 1:
        return product
    if form == 2:
        return f"{product} for {word}"
    return f"best {word} {TIERS[int(r * 31) % len(TIERS)]}"


def generate_world(cfg: WorldConfig | None = None) -> World:
    """Generate the synthetic world. Pure and seeded: the same config gives identical output."""
    cfg = cfg or WorldConfig()
    began = time.perf_counter()
    root = np.random.SeedSequence(cfg.seed)
    seed_model, seed_people, seed_channels = root.spawn(3)
    rng_model, rng_people = np.random.default_rng(seed_model), np.random.default_rng(seed_people)
    # two streams per channel (items, sequences), so channels do not shift each other
    channel_rngs = [np.random.default_rng(s) for s in seed_channels.spawn(2 * len(cfg.channels))]

    transition = _transition_matrix(rng_model)
    k = len(INTERESTS)
    width = max(5, len(str(cfg.people - 1)))
    person_ids = np.array([f"u{i:0{width}d}" for i in range(cfg.people)], dtype=str)
    theta = rng_people.dirichlet(np.full(k, cfg.dirichlet_alpha), size=cfg.people)
    membership = _memberships(cfg, rng_people)

    catalogues: dict[str, Catalogue] = {}
    interactions: dict[str, Interactions] = {}
    item_interests: dict[str, np.ndarray] = {}
    item_types: dict[str, np.ndarray] = {}
    popularity: dict[str, np.ndarray] = {}
    for c, spec in enumerate(cfg.channels):
        items = _items(spec, cfg, channel_rngs[2 * c])
        width_i = max(4, len(str(spec.items)))
        catalogues[spec.name] = Catalogue(
            channel=spec.name,
            item_ids=np.array(
                [f"{spec.name}-{i + 1:0{width_i}d}" for i in range(spec.items)], dtype=str
            ),
            titles=np.array(items["title"], dtype=str),
            descriptions=np.array(items["desc"], dtype=str),
            categories=np.array(items["category"], dtype=str),
            attributes=np.array(items["attrs"], dtype=str),
        )
        item_interests[spec.name] = np.stack(
            [
                np.asarray(items["primary"], dtype=np.int64),
                np.asarray(items["secondary"], dtype=np.int64),
            ],
            axis=1,
        )
        item_types[spec.name] = np.array(items["type"], dtype=str)
        popularity[spec.name] = np.asarray(items["popularity"], dtype=np.float64)
        people = np.flatnonzero(membership[:, c])
        interactions[spec.name] = _sequences(
            spec, cfg, channel_rngs[2 * c + 1], people, person_ids, theta, transition, items
        )
    return World(
        config=cfg,
        catalogues=catalogues,
        interactions=interactions,
        person_ids=person_ids,
        theta=theta,
        membership=membership,
        item_interests=item_interests,
        item_types=item_types,
        popularity=popularity,
        transition=transition,
        elapsed_s=time.perf_counter() - began,
    )


# ---------------------------------------------------------------------------------------------
# Summary statistics and the ``fedrec world`` command


def channel_stats(
    interactions: dict[str, Interactions], catalogues: dict[str, Catalogue]
) -> list[dict]:
    """Per channel: items, users, interactions, mean length, share of users on >= 2 channels."""
    users = {name: set(np.unique(x.user_ids).tolist()) for name, x in interactions.items()}
    rows = []
    for name, x in interactions.items():
        others = set().union(*(u for n, u in users.items() if n != name))
        n_users = len(users[name])
        rows.append(
            {
                "channel": name,
                "items": len(catalogues[name]),
                "users": n_users,
                "interactions": len(x),
                "mean_length": len(x) / n_users if n_users else 0.0,
                "multi_channel_share": len(users[name] & others) / n_users if n_users else 0.0,
            }
        )
    return rows


class Scenario(StrEnum):
    synthetic = "synthetic"
    movielens_1m = "movielens-1m"
    movielens_100k = "movielens-100k"


def parse_users(values: list[str]) -> dict[str, int]:
    """``["finance=400", "social=900"]`` to ``{"finance": 400, "social": 900}``.

    Raises:
        ValueError: a value that is not CHANNEL=N with a whole number N.
    """
    out: dict[str, int] = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit():
            raise ValueError(
                f"--users takes CHANNEL=N with a whole number N, e.g. finance=400. Found {value!r}."
            )
        out[name.strip()] = int(count)
    return out


def register(app: typer.Typer) -> None:
    """Add ``fedrec world`` to the fedrec app."""

    @app.command("world")
    def world_command(
        scenario: Annotated[Scenario, typer.Option(help="Which world to write.")] = (
            Scenario.synthetic
        ),
        out: Annotated[
            Path | None,
            typer.Option(
                help="Output folder. Default: worlds/<scenario> under the current folder."
            ),
        ] = None,
        seed: Annotated[
            int | None, typer.Option(help="Random seed (synthetic only). Default: 0.")
        ] = None,
        people: Annotated[
            int | None,
            typer.Option(
                help="Number of people (synthetic only); channel sizes scale with it. "
                "Default: 7000."
            ),
        ] = None,
        overlap: Annotated[
            float | None,
            typer.Option(
                help="Share of people on >= 2 channels (synthetic only). Alone, it keeps the "
                "channel sizes and changes the number of people. Default: 0.5."
            ),
        ] = None,
        users: Annotated[
            list[str] | None,
            typer.Option(
                help="CHANNEL=N: that channel's number of users (synthetic only; repeatable), "
                "e.g. --users finance=400 for a small new partner. People follow, at the same "
                "overlap.",
            ),
        ] = None,
        data_root: Annotated[
            Path | None,
            typer.Option(
                help="Folder holding movielens-1m/ and movielens-100k/. "
                "Default: $FEDREC_SHARED_DATA, else ../shared/data beside the repository."
            ),
        ] = None,
        domains: Annotated[
            str | None,
            typer.Option(
                help="MovieLens only: 'genre' (genre domains as channels) or 'none' (every "
                "rating in one channel, in RecBole's time order). Default: genre."
            ),
        ] = None,
        force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    ) -> None:
        """Write a scenario (synthetic world or MovieLens domains) as a dataset folder."""
        from rich.console import Console
        from rich.table import Table

        from fedrec.simulations.movielens import DOMAIN_SPLITS

        console = Console()
        name = scenario.value
        if domains is not None and domains not in DOMAIN_SPLITS:
            console.print(
                f"[red]--domains must be one of {list(DOMAIN_SPLITS)}. Found {domains!r}.[/red]"
            )
            raise typer.Exit(2)
        pooled = domains == "none"
        out_dir = (
            out if out is not None else Path("worlds") / (f"{name}-pooled" if pooled else name)
        )
        if out_dir.exists() and not force:
            console.print(f"[red]{out_dir} already exists[/red]; pass --force to replace it.")
            raise typer.Exit(1)

        began = time.perf_counter()
        if scenario is Scenario.synthetic:
            if domains is not None:
                console.print("[red]--domains only applies to the MovieLens scenarios.[/red]")
                raise typer.Exit(2)
            try:
                cfg = WorldConfig(seed=0 if seed is None else seed).resized(
                    people=people, overlap=overlap
                )
                if users:
                    cfg = cfg.with_users(parse_users(users))
            except (ConfigError, ValueError) as err:
                console.print(f"[red]{err}[/red]")
                raise typer.Exit(2) from None
            world = generate_world(cfg)
            catalogues, interactions = world.catalogues, world.interactions
            source, extra = world.source(), world.ground_truth_files()
        else:
            given = [
                flag
                for flag, v in (
                    ("--seed", seed),
                    ("--people", people),
                    ("--overlap", overlap),
                    ("--users", users or None),
                )
                if v is not None
            ]
            if given:
                console.print(f"[red]{', '.join(given)} only apply to --scenario synthetic.[/red]")
                raise typer.Exit(2)
            from fedrec.simulations.movielens import load_scenario, scenario_dir

            folder = scenario_dir(name, data_root)
            if not folder.is_dir():
                console.print(
                    f"[red]{name} data not found at {folder}.[/red] Point --data-root at the "
                    f"folder that holds {folder.name}/ (or set $FEDREC_SHARED_DATA)."
                )
                raise typer.Exit(1)
            try:
                catalogues, interactions, source = load_scenario(
                    name, data_root, domains=domains or "genre"
                )
            except (FileNotFoundError, ValueError) as err:
                console.print(f"[red]{err}[/red]")
                raise typer.Exit(1) from None
            extra = None

        from fedrec.shared.datasets import write_dataset

        # atomic: built under a temporary sibling, then renamed over any existing folder
        path = write_dataset(
            out_dir,
            name=name,
            catalogues=catalogues,
            interactions=interactions,
            source=source,
            extra_files=extra,
        )
        elapsed = time.perf_counter() - began

        table = Table(title=f"fedrec world: {name}")
        for col in (
            "channel",
            "items",
            "users",
            "interactions",
            "mean length",
            "users on >= 2 channels",
        ):
            table.add_column(col, justify="left" if col == "channel" else "right")
        for row in channel_stats(interactions, catalogues):
            table.add_row(
                row["channel"],
                f"{row['items']:,}",
                f"{row['users']:,}",
                f"{row['interactions']:,}",
                f"{row['mean_length']:.1f}",
                f"{row['multi_channel_share']:.0%}",
            )
        console.print(table)
        console.print(f"Wrote {path} in {elapsed:.1f} s")
