"""The results web page: log in, the studies, one study's timeline, and the admin's actions.

Sessions live in the web process (a random token in an HttpOnly, SameSite=Strict
cookie, Secure over HTTPS; eight hours idle): a restart logs everyone out.
Every form carries the session's CSRF token and every POST without it is
refused (403). Logins (good and bad) and every action are audited with the
user's name and address; viewers see, admins also resend and re-analyse.
The JSON API (``/api/studies``, ``/api/studies/{uid}``) takes the same session.

A study's page shows its result image (the summary image when one was made,
else the top key slice in a lung window with the findings marked), its SR in
words, and each delivery with a retry for the dead ones.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from node.audit import Action, AuditError, AuditTrail, Outcome
from node.config import Config, reread
from node.history import (STATES, StateCache, local_time, parse_since, reanalyse, recorded_sends, resend, study_state,
                          timeline)
from node.results.facts import percent
from node.store import Storage, check_uid
from node.users import User, Users

logger = logging.getLogger(__name__)

COOKIE = "ainode_session"
IDLE_S = 8 * 3600
PAGE_SIZE = 50
FAILED_LOGIN_DELAY_S = 1.0
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


TEMPLATES.env.filters["localtime"] = local_time
TEMPLATES.env.filters["percent"] = percent


@dataclass
class Session:
    user: User
    csrf: str
    seen: float = field(default_factory=time.monotonic)


class Pages:
    def __init__(self, cfg: Config, redis: Any, audit: AuditTrail) -> None:
        self.cfg = cfg
        try:  # the time of the file the config was just loaded from: read again once it changes
            self._cfg_mtime: float | None = cfg.source.stat().st_mtime if cfg.source is not None else None
        except OSError:
            self._cfg_mtime = None
        self.redis = redis
        self.audit = audit
        self.storage = Storage(cfg.node.storage)
        self.users = Users(cfg.node.storage)
        self.sessions: dict[str, Session] = {}
        self.cache = StateCache()
        self._heads: dict[str, dict[str, str]] = {}  # study -> patient, accession, sender (as first received)
        self._cache_lock = threading.Lock()

    # --- sessions -------------------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        token = request.cookies.get(COOKIE, "")
        s = self.sessions.get(token)
        if s is None:
            return None
        if time.monotonic() - s.seen > IDLE_S or s.user.name not in {u.name for u in self.users.list()}:
            self.sessions.pop(token, None)  # idle too long, or removed since
            return None
        s.seen = time.monotonic()
        return s

    def _audit(self, call: Callable[..., None], *args: Any) -> None:
        try:
            call(*args)
        except AuditError:
            pass  # the trail says why in the node's log; the page goes on

    @staticmethod
    def _address(request: Request) -> str:
        return request.client.host if request.client else "?"

    # --- pages ----------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return TEMPLATES.TemplateResponse(request, "login.html", {"error": None})

    async def login(self, request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("user", "")), str(form.get("password", ""))
        user = await run_in_threadpool(self.users.verify, name, password)
        address = self._address(request)
        if user is None:
            self._audit(self.audit.user_authentication, name, address, True, False,
                        "web login refused: wrong user name or password")
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)  # a guesser gets one try a second per connection
            return TEMPLATES.TemplateResponse(request, "login.html", {"error": "Wrong user name or password."},
                                              status_code=401)
        token = secrets.token_urlsafe(32)
        self.sessions[token] = Session(user, secrets.token_urlsafe(32))
        self._audit(self.audit.user_authentication, user.name, address, True, True, f"web login ({user.role})")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=self.cfg.web.tls,
                            max_age=IDLE_S)
        return response

    async def logout(self, request: Request) -> Response:
        s = self.session(request)
        if s is not None and await self._csrf_ok(request, s):
            self.sessions.pop(request.cookies.get(COOKIE, ""), None)
            self._audit(self.audit.user_authentication, s.user.name, self._address(request), False, True,
                        "web logout")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    async def studies(self, request: Request) -> Response:
        s = self.session(request)
        if s is None:
            return RedirectResponse("/login", status_code=303)
        state = request.query_params.get("state") or None
        since, problem = _since(request.query_params.get("since", ""))
        try:
            page = max(1, int(request.query_params.get("page", "1") or 1))
        except ValueError:
            page = 1
        rows = await run_in_threadpool(self._rows, state, since)
        shown = rows[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
        headers = await run_in_threadpool(self._headers, shown)
        query = "&".join(f"{k}={urllib.parse.quote(v)}" for k, v in (("state", state or ""),
                         ("since", request.query_params.get("since", "") if since else "")) if v)
        return TEMPLATES.TemplateResponse(request, "studies.html", {
            "session": s, "rows": list(zip(shown, headers)), "states": STATES, "state": state, "page": page,
            "pages": max(1, (len(rows) + PAGE_SIZE - 1) // PAGE_SIZE), "total": len(rows), "query": query,
            "since": request.query_params.get("since", "") if since else "", "since_problem": problem,
            "spans": SPANS}, status_code=400 if problem else 200)

    async def study(self, request: Request) -> Response:
        s = self.session(request)
        if s is None:
            return RedirectResponse("/login", status_code=303)
        uid = self._uid(request)
        if uid is None:
            return Response("no such study", status_code=404)
        st, events, outcome = await run_in_threadpool(self._study, uid)
        sends = recorded_sends(self.storage, uid, st.revision) if st.revision else []
        return TEMPLATES.TemplateResponse(request, "study.html", {
            "session": s, "st": st, "events": events, "result": (outcome or {}).get("result"),
            "has_image": bool(outcome and outcome.get("status") == "analysed"), "sends": sends,
            "has_report": bool(outcome and _sr_name(outcome)), "message": request.query_params.get("message")})

    async def image(self, request: Request) -> Response:
        """The result image of the study's latest analysed revision, as PNG."""
        if self.session(request) is None:
            return Response("log in first", status_code=401)
        uid = self._uid(request)
        png = await run_in_threadpool(self._image, uid) if uid else None
        if png is None:
            return Response("no result image", status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})

    async def report(self, request: Request) -> Response:
        """The SR of the study's latest analysed revision, in words."""
        s = self.session(request)
        if s is None:
            return RedirectResponse("/login", status_code=303)
        uid = self._uid(request)
        found = await run_in_threadpool(self._report, uid) if uid else None
        if found is None:
            return Response("no SR for this study", status_code=404)
        revision, sr_uid, lines = found
        return TEMPLATES.TemplateResponse(request, "report.html", {
            "session": s, "uid": uid, "revision": revision, "sr_uid": sr_uid, "lines": lines})

    async def action(self, request: Request) -> Response:
        s = self.session(request)
        if s is None:
            return Response("log in first", status_code=401)
        if not await self._csrf_ok(request, s):
            self._audit(self.audit.user_authentication, s.user.name, self._address(request), True, False,
                        "web action refused: no or a wrong CSRF token")
            return Response("refused: the form's CSRF token is missing or wrong", status_code=403)
        if s.user.role != "admin":
            return Response("refused: only an admin may do this", status_code=403)
        uid = self._uid(request)
        if uid is None:
            return Response("no such study", status_code=404)
        what = request.path_params["action"]
        try:
            if what == "reanalyse":
                rev = await run_in_threadpool(reanalyse, self.storage, self.redis, uid)
                message, revision = f"revision {rev.revision} queued", rev.revision
            elif what == "resend":
                dest = str((await request.form()).get("dest", "")) or None  # one destination (a dead letter)
                jobs = await run_in_threadpool(resend, self.storage, self._config(), self.redis, uid, dest)
                message = f"{len(jobs)} delivery(ies) queued" + (f" to {dest}" if dest else "")
                revision = self.storage.revisions(uid)[-1]
            else:
                return Response("no such action", status_code=404)
        except LookupError as exc:
            return RedirectResponse(f"/studies/{uid}?message={exc.args[0]}", status_code=303)
        self._audit(self.audit.job, uid, revision, Action.EXECUTE, Outcome.SUCCESS,
                    f"{what} requested by {s.user.name} (web, from {self._address(request)}): {message}")
        return RedirectResponse(f"/studies/{uid}?message={message}", status_code=303)

    # --- the JSON API ------------------------------------------------------------------------

    async def api_studies(self, request: Request) -> Response:
        if self.session(request) is None:
            return JSONResponse({"error": "log in first"}, status_code=401)
        since, problem = _since(request.query_params.get("since", ""))
        if problem:
            return JSONResponse({"error": problem}, status_code=400)
        rows = await run_in_threadpool(self._rows, request.query_params.get("state") or None, since)
        return JSONResponse([r.to_json() for r in rows])

    async def api_study(self, request: Request) -> Response:
        if self.session(request) is None:
            return JSONResponse({"error": "log in first"}, status_code=401)
        uid = self._uid(request)
        if uid is None:
            return JSONResponse({"error": "no such study"}, status_code=404)
        st, events, outcome = await run_in_threadpool(self._study, uid)
        return JSONResponse({"state": st.to_json(), "timeline": [{"at": at, "what": w} for at, w in events],
                             "result": (outcome or {}).get("result")})

    # --- helpers ---------------------------------------------------------------------------------

    def _config(self) -> Config:
        """The config, read again when its file changed (an admin added a destination or a pipeline since):
        what a resend from the page sends to. Storage, Redis and [web] stay as the process started."""
        new, self._cfg_mtime = reread(self.cfg, self._cfg_mtime)
        if new is not None:
            self.cfg = replace(new, node=replace(new.node, storage=self.cfg.node.storage), redis=self.cfg.redis,
                               web=self.cfg.web)
        return self.cfg

    async def _csrf_ok(self, request: Request, s: Session) -> bool:
        form = await request.form()
        return hmac.compare_digest(str(form.get("csrf", "")), s.csrf)

    def _uid(self, request: Request) -> str | None:
        try:
            uid = check_uid(request.path_params["uid"], "Study Instance UID")
        except Exception:
            return None
        return uid if (self.storage.studies / uid).is_dir() else None  # one stat, not a listing of every study

    def _rows(self, state: str | None, since: float | None = None) -> list[Any]:
        with self._cache_lock:  # one request at a time refreshes the cache
            rows = self.cache.states(self.storage, self._config(), self.redis)
        return [r for r in rows if (not state or r.state == state) and (since is None or (r.last_at or 0) >= since)]

    def _headers(self, rows: list[Any]) -> list[dict[str, str]]:
        """Patient, accession and sender as the PACS sent them, from one instance's header (shown rows only)."""
        import pydicom

        out = []
        for row in rows:
            if row.study_uid in self._heads:
                out.append(self._heads[row.study_uid])
                continue
            files = self.storage.instances(row.study_uid)
            head: dict[str, str] = {}
            if files:
                try:
                    ds = pydicom.dcmread(files[0].path, stop_before_pixels=True)
                    head = {"patient": str(ds.get("PatientName", "")), "patient_id": str(ds.get("PatientID", "")),
                            "accession": str(ds.get("AccessionNumber", "")),
                            "sender": str(ds.file_meta.get("SourceApplicationEntityTitle", ""))}
                except Exception:  # an unreadable header: the row still shows
                    head = {}
            if head:
                self._heads[row.study_uid] = head
            out.append(head)
        return out

    def _study(self, uid: str) -> tuple[Any, list[tuple[float, str]], dict[str, Any] | None]:
        st = study_state(self.storage, self._config(), self.redis, uid)
        outcome = self.storage.read_outcome(uid, st.revision) if st.revision else None
        return st, timeline(self.storage, self.cfg.audit_path, uid), outcome


    def _analysed(self, uid: str) -> tuple[int, dict[str, Any]] | None:
        """The latest analysed revision and its outcome."""
        for rev in reversed(self.storage.revisions(uid)):
            outcome = self.storage.read_outcome(uid, rev)
            if outcome and outcome.get("status") == "analysed":
                return rev, outcome
        return None

    def _image(self, uid: str) -> bytes | None:
        found = self._analysed(uid)
        if found is None:
            return None
        rev, outcome = found
        return result_png(self.storage, uid, rev, outcome)

    def _report(self, uid: str) -> tuple[int, str, list[Any]] | None:
        import pydicom

        from node.results.sr_words import sr_in_words

        found = self._analysed(uid)
        if found is None or not (name := _sr_name(found[1])):
            return None
        rev, outcome = found
        path = self.storage.results / uid / name
        if not path.exists():
            return None
        sr = pydicom.dcmread(path)
        return rev, str(sr.SOPInstanceUID), sr_in_words(sr, _image_labels(outcome.get("result", {})))


#: The spans the studies page offers as links (any ``since`` the CLI takes also works in the URL).
SPANS = (("last hour", "1h"), ("24 hours", "24h"), ("7 days", "7d"), ("30 days", "30d"))


def _since(text: str) -> tuple[float | None, str | None]:
    """``?since=``: (the time, None), (None, None) when not given, or (None, why) when not understood."""
    if not text.strip():
        return None, None
    try:
        return parse_since(text), None
    except ValueError as exc:
        return None, str(exc)


def _sr_name(outcome: dict[str, Any]) -> str | None:
    """The file of the SR an analysed revision made (the default class first)."""
    objects = outcome.get("objects", {})
    for kind in sorted(objects, key=lambda k: (k != "sr-comprehensive", k)):
        if kind.startswith("sr-"):
            return str(objects[kind])
    return None


def _image_labels(result: dict[str, Any]) -> dict[str, str]:
    """SOP Instance UID -> how people name the image (its Instance Number), for the images a result names."""
    out = {}
    for item in [*result.get("findings", []), *result.get("key_images", [])]:
        image = item.get("image", {})
        number = image.get("instance_number")
        out[str(image.get("sop_instance_uid"))] = str(number if number is not None else image.get("slice_index", 0) + 1)
    return out


#: The lung window a key slice is shown in (centre, width in HU), as the summary image uses.
LUNG_WINDOW = (-600.0, 1500.0)


def result_png(storage: Storage, uid: str, revision: int, outcome: dict[str, Any]) -> bytes | None:
    """The summary image the revision made, as PNG; without one, its top slice (a finding's, else the best
    key image) in a lung window, each finding on it circled."""
    import io

    import numpy as np
    import pydicom
    from PIL import Image, ImageDraw

    made = outcome.get("objects", {}).get("sc")
    path = storage.results / uid / made if made else None
    if path is not None and path.exists():
        picture = Image.fromarray(np.asarray(pydicom.dcmread(path).pixel_array, dtype=np.uint8))
    else:
        result = outcome.get("result", {})
        top = (result.get("findings") or result.get("key_images") or [None])[0]
        if top is None:
            return None
        sop = str(top["image"]["sop_instance_uid"])
        series = storage.read_revision(uid, revision).instances.get(sop)
        if series is None or not (source := storage.instance_path(uid, series, sop)).exists():
            return None
        ds = pydicom.dcmread(source)
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        centre, width = LUNG_WINDOW
        grey = np.clip((hu - (centre - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
        picture = Image.fromarray(grey).convert("RGB")
        draw = ImageDraw.Draw(picture)
        for f in result.get("findings", []):
            if f["image"]["sop_instance_uid"] == sop:
                r = max(6.0, picture.width / 40)
                draw.ellipse((f["column"] - r, f["row"] - r, f["column"] + r, f["row"] + r), outline=(255, 200, 0),
                             width=2)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def routes(pages: Pages) -> list[Route]:
    return [
        Route("/", pages.studies),
        Route("/login", pages.login_form, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/studies/{uid}", pages.study),
        Route("/studies/{uid}/image.png", pages.image, methods=["GET"]),
        Route("/studies/{uid}/report", pages.report, methods=["GET"]),
        Route("/studies/{uid}/{action}", pages.action, methods=["POST"]),
        Route("/api/studies", pages.api_studies),
        Route("/api/studies/{uid}", pages.api_study),
    ]
