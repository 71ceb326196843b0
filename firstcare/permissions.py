"""Who may see what: the one permission rule, pure.

Roles: ``admin`` and ``service`` see everything; a ``clinician`` sees the hospitals listed in
its ``hospitals`` claim and the patients and devices of those hospitals; a ``patient`` sees only
the patients listed in its ``patients`` claim (its own record) and the ``system`` room.

The caller resolves which hospital a patient or device belongs to (that needs the database)
and passes it in; an unknown owner (``None``) is treated exactly like a forbidden one, so an
answer never reveals whether a patient exists in another hospital.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firstcare.rooms import Room

ROLES = frozenset({"admin", "clinician", "patient", "service"})


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    role: str
    exp: int
    hospitals: frozenset[str] = field(default_factory=frozenset)
    patients: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def sees_everything(self) -> bool:
        return self.role in ("admin", "service")


def can_view_hospital(claims: Claims, hospital_id: str | None) -> bool:
    if claims.sees_everything:
        return True
    return claims.role == "clinician" and hospital_id is not None and hospital_id in claims.hospitals


def can_view_patient(claims: Claims, patient_id: str, patient_hospital: str | None) -> bool:
    if claims.sees_everything:
        return True
    if claims.role == "patient":
        return patient_id in claims.patients
    return can_view_hospital(claims, patient_hospital)


def can_subscribe(claims: Claims, room: Room, owner_hospital: str | None = None) -> bool:
    """May ``claims`` join ``room``? ``owner_hospital`` is the hospital of the room's patient
    or device (ignored for hospital and system rooms)."""
    if room.kind == "system":
        return claims.role in ROLES
    if room.kind in ("hospital", "hospital_alerts"):
        return can_view_hospital(claims, room.hospital_id)
    if room.patient_id is not None:
        return can_view_patient(claims, room.patient_id, owner_hospital)
    if room.kind == "device":
        return can_view_hospital(claims, owner_hospital)
    return False


def visible_hospitals(claims: Claims) -> frozenset[str] | None:
    """Hospitals a listing may include; ``None`` means no restriction."""
    if claims.sees_everything:
        return None
    return claims.hospitals if claims.role == "clinician" else frozenset()
