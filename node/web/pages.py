"""The results web page: log in, the studies, one study's timeline, and the admin's actions.

Sessions live in the web process (a random token in an HttpOnly, SameSite=Strict
cookie, Secure over HTTPS; eight hours idle): a restart logs everyone out.
Every form carries the session's CSRF token and every POST without it is
refused (403). Logins (good and bad) and every action are audited with the
user's name and address; viewers see, admins also resend and re-analyse.
The JSON API (``/api/studies``, ``/api/studies/{uid}``) takes the same session.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from node.audit import Action, AuditError, AuditTrail, Outcome
from node.config import Config
from node.history import STATES, StateCache, local_time, reanalyse, resend, study_state, timeline
from node.results.facts import percent
from node.store import Storage, check_uid
from node.users import User, Users

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
        page = max(1, int(request.query_params.get("page", "1") or 1))
        rows = await run_in_threadpool(self._rows, state)
        shown = rows[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
        headers = await run_in_threadpool(self._headers, shown)
        return TEMPLATES.TemplateResponse(request, "studies.html", {
            "session": s, "rows": list(zip(shown, headers)), "states": STATES, "state": state, "page": page,
            "pages": max(1, (len(rows) + PAGE_SIZE - 1) // PAGE_SIZE), "total": len(rows)})

    async def study(self, request: Request) -> Response:
        s = self.session(request)
        if s is None:
            return RedirectResponse("/login", status_code=303)
        uid = self._uid(request)
        if uid is None:
            return Response("no such study", status_code=404)
        st, events, outcome = await run_in_threadpool(self._study, uid)
        return TEMPLATES.TemplateResponse(request, "study.html", {
            "session": s, "st": st, "events": events, "result": (outcome or {}).get("result"),
            "message": request.query_params.get("message")})

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
                jobs = await run_in_threadpool(resend, self.storage, self.cfg, self.redis, uid)
                message, revision = f"{len(jobs)} delivery(ies) queued", self.storage.revisions(uid)[-1]
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
        rows = await run_in_threadpool(self._rows, request.query_params.get("state") or None)
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

    async def _csrf_ok(self, request: Request, s: Session) -> bool:
        form = await request.form()
        return hmac.compare_digest(str(form.get("csrf", "")), s.csrf)

    def _uid(self, request: Request) -> str | None:
        try:
            uid = check_uid(request.path_params["uid"], "Study Instance UID")
        except Exception:
            return None
        return uid if (self.storage.studies / uid).is_dir() else None  # one stat, not a listing of every study

    def _rows(self, state: str | None) -> list[Any]:
        with self._cache_lock:  # one request at a time refreshes the cache
            rows = self.cache.states(self.storage, self.cfg, self.redis)
        return [r for r in rows if r.state == state] if state else rows

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
        st = study_state(self.storage, self.cfg, self.redis, uid)
        outcome = self.storage.read_outcome(uid, st.revision) if st.revision else None
        return st, timeline(self.storage, self.cfg.audit_path, uid), outcome


def routes(pages: Pages) -> list[Route]:
    return [
        Route("/", pages.studies),
        Route("/login", pages.login_form, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/studies/{uid}", pages.study),
        Route("/studies/{uid}/{action}", pages.action, methods=["POST"]),
        Route("/api/studies", pages.api_studies),
        Route("/api/studies/{uid}", pages.api_study),
    ]
