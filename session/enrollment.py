"""Enrolment from photos (back-office import: the admin API and ``facepay enroll``).

Photos are decoded one at a time, in the executor, after the account's fields passed: a
``Photo`` may be a function that decodes it, so that at most one decoded photo (up to 40 MP,
120 MB) is alive at once and a bad file costs nothing before a typo is reported.

Each photo must hold exactly one usable face: none is refused ``no_face``; a second face at
least half the area of the largest is refused ``several_faces`` (whose face would we keep?);
a face upside down (a scan or a re-encoded file the wrong way round) is refused
``upside_down``; a face that fails the quality gate is refused with the gate's reasons
(``cut_off`` for one the photo's edge cuts off). Every accepted photo
gives one template. CPU work (detection, embedding, argon2) runs in the executor.

Liveness is deliberately NOT required here: these are photos chosen by an operator for a
back-office import (DESIGN §2), so a liveness score would only say "this is a photo". Live
enrolment at a terminal, with multi-frame liveness, is the enroll session's job.

Nothing here logs the passphrase, its hash or an embedding.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from pipeline.analyzer import FaceAnalyzer
from pipeline.errors import AlreadyEnrolled, Conflict, ImageError, NotFound, QualityError
from pipeline.types import FloatArray, ImageArray
from session import _store_lua as _store_rules
from session.crypto import PassphraseHasher, check_passphrase
from session.directory import Directory
from session.models import Account
from session.store import Store

log = logging.getLogger(__name__)

#: A second face at least this share of the largest face's area makes a photo ambiguous.
SECOND_FACE_AREA_RATIO = 0.5

#: A photo to enrol from: a decoded image, or a function that decodes it (or raises
#: ImageError), called in the executor when that photo's turn comes.
Photo = ImageArray | Callable[[], ImageArray]


class ImageQualityError(QualityError):
    """A QualityError that also says which photo (0-based ``index``) was refused."""

    def __init__(self, index: int, message: str, reasons: tuple[str, ...]) -> None:
        super().__init__(f"image {index}: {message}", reasons)
        self.index = index


class ImageFileError(ImageError):
    """A photo that could not be decoded; ``index`` is its 0-based position."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"image {index}: {message}")
        self.index = index


def check_account_fields(account_id: str, name: str, phone: str) -> None:
    """InvalidRequest unless the account id, name and phone are what the store accepts.

    Checked before any photo is analysed, so a typo fails fast; the rules are the store's.
    """
    _store_rules.check_account_fields(account_id, name, phone)


def template_from_image(analyzer: FaceAnalyzer, image: ImageArray, index: int) -> FloatArray:
    """The embedding of the one good face in ``image``, or QualityError with reasons.

    ``index`` only names the photo in the error message (0-based, as given).
    """
    faces = analyzer.detect(image)
    if not faces:
        raise ImageQualityError(index, "no face found", ("no_face",))
    faces = sorted(faces, key=lambda f: f.box.area, reverse=True)
    main = faces[0]
    if len(faces) > 1 and faces[1].box.area >= SECOND_FACE_AREA_RATIO * main.box.area:
        raise ImageQualityError(
            index, "several faces of comparable size; use a photo of one person", ("several_faces",)
        )
    # Its landmarks look upright either way, so only the detector, run again on the photo
    # turned round, can tell (pipeline/orientation.py): an upside-down template matches
    # neither its person nor safely anyone else. Every face goes in, so that another face's
    # turned copy cannot stand in for the main face's (main is faces[0]).
    if analyzer.upside_down(image, faces)[0]:
        raise ImageQualityError(
            index, "face is upside down; turn the photo the right way up", ("upside_down",)
        )
    # liveness=False: back-office photo import (see the module docstring and DESIGN §2).
    analysis = analyzer.analyze_face(image, main, embed=True, liveness=False)
    if not analysis.quality.ok:
        reasons = analysis.quality.reasons or ("bad_quality",)
        raise ImageQualityError(
            index, f"face refused by the quality gate ({', '.join(reasons)})", reasons
        )
    if analysis.embedding is None:  # pragma: no cover - analyze_face embeds a passing face
        raise ImageQualityError(index, "face could not be embedded", ("no_embedding",))
    return analysis.embedding


def template_from_photo(analyzer: FaceAnalyzer, photo: Photo, index: int) -> FloatArray:
    """``template_from_image`` of ``photo``, decoding it first if it is a function.

    The decoded image lives only for this call. ImageFileError if it cannot be decoded.
    """
    if callable(photo):
        try:
            image = photo()
        except ImageError as exc:
            raise ImageFileError(index, str(exc)) from None
    else:
        image = photo
    return template_from_image(analyzer, image, index)


async def templates_from_images(
    analyzer: FaceAnalyzer, executor: Executor, images: Sequence[Photo]
) -> list[FloatArray]:
    """One template per photo, computed in the executor one photo at a time; the first
    refusal wins.

    Every photo must show the person of the first one (cosine at least the 1:N match
    threshold): one consent covers one person, and a photo of someone else mixed into a
    batch would let that person pay from this account. On the shared photos the same
    person scores 0.65-1.0 and different people at most 0.12 (threshold 0.45).
    """
    if not images:
        raise QualityError("no image given", ("no_image",))
    loop = asyncio.get_running_loop()
    templates: list[FloatArray] = []
    threshold = analyzer.config.match.threshold
    for index, image in enumerate(images):
        template = await loop.run_in_executor(executor, template_from_photo, analyzer, image, index)
        if templates and float(np.dot(templates[0], template)) < threshold:
            raise ImageQualityError(
                index, "face is not the person of the first photo", ("different_person",)
            )
        templates.append(template)
    return templates


async def refuse_duplicate(
    directory: Directory, executor: Executor, templates: Sequence[FloatArray], phone: str
) -> None:
    """AlreadyEnrolled when a checkout could never tell this face from an enrolled one.

    A checkout that finds look-alikes asks for the last four digits of the phone and then
    searches only the subjects whose phone ends with them. A face that scores at the match
    threshold or above against such a subject would leave both accounts declined
    ``ambiguous`` at every checkout and denied at every gate: typically the same person
    enrolling again under a new account id. Refused before anything is written.
    Look-alikes with other digits (twins) may enrol: a checkout tells them apart by the
    digits, and a gate, which cannot ask, sends both to the ticket gate.
    """
    last4 = "".join(c for c in phone if c.isdigit())[-4:]
    loop = asyncio.get_running_loop()
    for template in templates:
        decision = await loop.run_in_executor(executor, directory.identify, template, last4)
        if decision.status != "no_match":
            raise AlreadyEnrolled(
                "this face is already enrolled with a phone ending in the same four digits"
            )


async def refuse_taken_id(store: Store, account_id: str) -> None:
    """Conflict if ``account_id`` belongs to an account, before any face is looked at.

    Otherwise a taken id would make the face checks an oracle: ``already_enrolled`` against
    ``conflict`` would say, for any photo and four guessed digits, whether that person is
    enrolled with a phone ending in them, with nothing written. (An id taken between this
    check and the write is still refused by the write.)
    """
    try:
        await store.get_account(account_id)
    except NotFound:
        return
    raise Conflict("account id already taken")


async def enroll_from_images(
    *,
    store: Store,
    directory: Directory,
    analyzer: FaceAnalyzer,
    hasher: PassphraseHasher,
    executor: Executor,
    account_id: str,
    name: str,
    phone: str,
    passphrase: str,
    images: Sequence[Photo],
    consent: Mapping[str, str],
    search_executor: Executor | None = None,
) -> tuple[Account, int]:
    """Create an account from photos; returns (account, number of templates).

    ``search_executor`` runs the duplicate check's searches (the server's search thread:
    never queued behind inference while ``Directory.enrolling`` is held); ``executor``
    by default.

    Raises InvalidRequest (fields or passphrase rules), ImageFileError (a photo that cannot
    be decoded, found only after the fields passed), ImageQualityError (a photo refused,
    with reasons), AlreadyEnrolled (see ``refuse_duplicate``; checked against ``directory``,
    which the command line passes empty: it loads no gallery), Conflict (account id taken)
    or StoreUnavailable. The new subject is added to this
    process's directory at once; other instances learn of it through ``fp:events``.
    """
    check_passphrase(passphrase)
    check_account_fields(account_id, name, phone)
    await refuse_taken_id(store, account_id)
    templates = await templates_from_images(analyzer, executor, images)
    loop = asyncio.get_running_loop()
    passhash = await loop.run_in_executor(executor, hasher.hash, passphrase)
    # From the duplicate check to the index one enrolment at a time (Directory.enrolling).
    async with directory.enrolling:
        await refuse_duplicate(directory, search_executor or executor, templates, phone)
        account, subject_id = await store.create_account(
            account_id, name, phone, passhash, templates, consent
        )
        # The store also publishes ``enrolled:{sid}``; stream_server.sync skips a subject
        # that is already indexed, so adding it here at once does not index it twice.
        directory.add(subject_id, templates, account.phone_last4)
    log.info("enrolled account %s with %s templates", account.account_id, len(templates))
    return account, len(templates)
