"""Create (or update) a Label Studio annotator account. Runs in Label Studio's own venv.

Called by ``scripts/labelstudio.sh add-user`` with the same environment the server starts with
(LABEL_STUDIO_BASE_DATA_DIR, DJANGO_DB, POSTGRE_*), so it writes the server's own database.
Label Studio's signup is closed (LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true), so this is how
an operator gives an annotator a login. Inputs come from the environment, never argv (argv is
visible to every user of the machine): LS_USER_EMAIL, optional LS_USER_PASSWORD, and
LS_USER_DIR, where ``<email>.password`` (generated when no password is given and none is there
yet) and ``<email>.token`` (the account's API token) are kept with mode 600. Prints one JSON line
without secrets: ``{"id", "email", "created", "password_file", "token_file"}``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from pathlib import Path

_EMAIL = re.compile(r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$")


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def main() -> int:
    email = os.environ.get("LS_USER_EMAIL", "").strip().lower()
    if not _EMAIL.match(email):
        print(f"not an e-mail address: {email!r}", file=sys.stderr)
        return 64
    user_dir = Path(os.environ["LS_USER_DIR"])
    user_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    password_file = user_dir / f"{email}.password"
    password = os.environ.get("LS_USER_PASSWORD", "")
    if password or not password_file.exists():
        _write_secret(password_file, password or secrets.token_urlsafe(18))
    password = password_file.read_text()

    from label_studio.server import _setup_env

    _setup_env()
    import django

    django.setup()
    from organizations.models import Organization
    from rest_framework.authtoken.models import Token
    from users.models import User

    # The single organization the headless start created with the admin (community edition).
    org = Organization.objects.order_by("id").first()
    if org is None:
        print("Label Studio has no organization yet: start it once first", file=sys.stderr)
        return 1
    user = User.objects.filter(email=email).first()
    created = user is None
    if created:
        user = User.objects.create_user(email=email, password=password, username=email)
    else:
        user.set_password(password)
    if not org.has_user(user):
        org.add_user(user)
    user.active_organization = org
    user.save()
    token, _ = Token.objects.get_or_create(user=user)
    token_file = user_dir / f"{email}.token"
    _write_secret(token_file, token.key)
    print(
        json.dumps(
            {
                "id": user.id,
                "email": email,
                "created": created,
                "password_file": str(password_file),
                "token_file": str(token_file),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
