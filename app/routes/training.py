"""Placeholder router, filled in by the training issue."""

from fastapi import APIRouter

router = APIRouter()
