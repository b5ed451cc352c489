"""The Firefly encoder's log-mel front end (spec §5.9): Hann-windowed STFT without centring on a
signal reflect-padded by (win - hop) / 2 on each side, magnitude sqrt(re² + im² + 1e-6), a
Slaney-scale, Slaney-normalised mel filterbank, and log(max(x, 1e-5))."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-12) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOG_STEP * (mel - _MIN_LOG_MEL)), _F_SP * mel)


def slaney_mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                          f_max: float | None = None) -> np.ndarray:
    """(n_freqs, n_mels) triangular filters on the Slaney mel scale, each scaled to unit area
    (Slaney normalisation). STFT bins sit at linspace(0, sample_rate // 2, n_freqs)."""
    f_max = float(sample_rate // 2) if f_max is None else f_max
    bins = np.linspace(0.0, sample_rate // 2, n_freqs)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)
    dist = edges[None, :] - bins[:, None]  # (n_freqs, n_mels + 2)
    rising = -dist[:, :-2] / widths[:-1]
    falling = dist[:, 2:] / widths[1:]
    fb = np.maximum(0.0, np.minimum(rising, falling))
    return fb * (2.0 / (edges[2:] - edges[:-2]))[None, :]


class LogMelSpectrogram(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.register_buffer("window", None, persistent=False)
        self.register_buffer("filterbank", None, persistent=False)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Derived, never stored; rebuilt after a meta-device construction."""
        with torch.device(device or "cpu"):
            self.window = torch.hann_window(self.win_length)
        fb = slaney_mel_filterbank(self.n_fft // 2 + 1, self.n_mels, self.sample_rate)
        self.filterbank = torch.from_numpy(fb).float().to(device or "cpu")

    def forward(self, audio: Tensor) -> Tensor:
        """audio (B, L) float -> log-mel (B, n_mels, L // hop)."""
        pad_left = (self.win_length - self.hop_length) // 2
        pad_right = (self.win_length - self.hop_length + 1) // 2
        x = F.pad(audio.float().unsqueeze(1), (pad_left, pad_right), mode="reflect").squeeze(1)
        spec = torch.stft(x, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window, center=False, normalized=False, onesided=True, return_complex=True)
        spec = torch.view_as_real(spec)
        magnitude = torch.sqrt(spec.pow(2).sum(-1) + 1e-6)  # (B, n_freqs, frames)
        mel = torch.matmul(magnitude.transpose(-1, -2), self.filterbank).transpose(-1, -2)
        return torch.log(torch.clamp(mel, min=1e-5))
