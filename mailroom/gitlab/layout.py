"""Where GitLab's relative paths lead, on each way GitLab is installed.

GitLab takes a relative path in gitlab.yml from its Rails root; MailRoom from its working
directory. Which directories those are depends on the installer:

- **Linux package** (and GitLab's Docker image, which is the Linux package): gitlab.yml is
  ``<gitlab_rails dir>/etc/gitlab.yml`` (``/var/opt/gitlab/gitlab-rails/etc``), the Rails root is
  ``/opt/gitlab/embedded/service/gitlab-rails`` (its ``config/gitlab.yml`` is a link to the
  former), and MailRoom runs in ``<gitlab_rails dir>/working``. ``secret_file:
  .gitlab_incoming_email_secret`` is a link in both directories to
  ``<gitlab_rails dir>/etc/gitlab_incoming_email_secret`` (the cookbook's ``templatesymlink``),
  so that file is found even where only ``/var/opt/gitlab`` is there (mailroom's container
  beside GitLab's).
- **Self-compiled**: gitlab.yml is ``<Rails root>/config/gitlab.yml`` and MailRoom runs in the
  Rails root (GitLab's ``gitlab-mailroom.service``).

Nothing here depends on the directory mailroom was started in. A ``secret_file`` is looked for
in each directory in turn (GitLab's view first: the JWT is checked with the Rails root's file);
a path that is not found is an error naming GitLab's key and every path tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailroom.errors import ConfigError

__all__ = ["OMNIBUS_RAILS_ROOT", "Layout", "find_layout"]

OMNIBUS_RAILS_ROOT = Path("/opt/gitlab/embedded/service/gitlab-rails")  # GITLAB_RAILS_SOURCE_DIR


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """The directories a GitLab installation resolves relative paths from."""

    kind: str  # "linux-package" or "self-compiled", for messages
    rails_root: Path  # GitLab's Rails root (it may be absent here: mailroom in a container)
    working_dir: Path  # MailRoom's working directory
    etc_dir: Path | None = None  # Linux package: where its links to the Rails root point

    def path(self, relative: str) -> Path:
        """A path GitLab expands from the Rails root (``File.expand_path(path, RAILS_ROOT)``):
        ``log_path``, ``shared.path``, ``encrypted_settings.path``."""
        return self.rails_root / relative

    def candidates(self, relative: str) -> list[Path]:
        """Where a relative ``secret_file`` may be: the Rails root (what GitLab reads), MailRoom's
        working directory, and on the Linux package the file its link points to."""
        found = [self.rails_root / relative, self.working_dir / relative]
        name = Path(relative)
        if self.etc_dir is not None and name.name == relative and relative.startswith("."):
            found.append(self.etc_dir / relative.removeprefix("."))
        return list(dict.fromkeys(found))

    def secret_file(self, value: str, where: str) -> Path:
        """The file ``value`` (GitLab's ``secret_file`` at ``where``) names: an absolute path
        as it is, a relative one where it is found; a ``ConfigError`` naming every path tried
        when there is none."""
        absolute = Path(value).is_absolute()
        tried = [Path(value)] if absolute else self.candidates(value)
        for path in tried:
            if path.is_file():
                return path
        if absolute:
            raise ConfigError(where, f"{value} does not exist (or is not a file)")
        shown = ", ".join(str(p) for p in tried)
        raise ConfigError(
            where,
            f"{value} is in none of the directories GitLab and MailRoom read it from on a "
            f"{self.kind} install (tried {shown}); give an absolute path, or check the file "
            "exists (gitlab-ctl reconfigure writes it on the Linux package)",
        )


def find_layout(gitlab_yml: Path) -> Layout:
    """The layout of the installation ``gitlab_yml`` (an absolute path) belongs to."""
    real = gitlab_yml.resolve()
    rails_dir = real.parent.parent
    if real.parent.name == "etc" and (rails_dir / "working").is_dir():
        # Linux package: <gitlab_rails dir>/etc/gitlab.yml beside working/
        root = OMNIBUS_RAILS_ROOT
        if gitlab_yml.parent.name == "config" and gitlab_yml.parent.parent != rails_dir:
            root = gitlab_yml.parent.parent  # named through the Rails root's link
        return Layout(
            kind="Linux package",
            rails_root=root,
            working_dir=rails_dir / "working",
            etc_dir=real.parent,
        )
    root = gitlab_yml.parent.parent  # <Rails root>/config/gitlab.yml (lib/gitlab/mail_room.rb)
    return Layout(kind="self-compiled", rails_root=root, working_dir=root)
