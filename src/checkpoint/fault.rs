//! What a process can still do when a memory-mapped input faults.
//!
//! Safetensors inputs are memory-mapped. When another process truncates a mapped file during a
//! merge, reading a page past its new end raises `SIGBUS`, which Rust cannot turn into a
//! returned error: the read is an ordinary memory access. On Linux,
//! [`handle_bus_errors`] installs a handler that finds the file whose map holds the faulting
//! address, writes an error naming it with `write(2)`, unlinks the temporaries this process
//! is writing (files first, then their folders) and ends the process with `_exit(1)`; a fault
//! at an address of no registered map gets the default action. Everything the handler touches
//! is registered beforehand in fixed tables of atomics: no allocation, no lock, only
//! async-signal-safe calls. Elsewhere nothing is installed, and a truncated input ends the
//! process as the default action does (the next run removes the temporary it left, see
//! `write`).

#[cfg(target_os = "linux")]
mod linux {
    use std::ffi::{CString, c_char};
    use std::path::Path;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

    const SLOTS: usize = 512;

    /// Mapped inputs: start, length and the file's name.
    struct Map {
        start: AtomicUsize,
        len: AtomicUsize,
        path: AtomicPtr<c_char>,
    }

    #[allow(clippy::declare_interior_mutable_const)]
    const EMPTY_MAP: Map = Map {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        path: AtomicPtr::new(null_mut()),
    };
    #[allow(clippy::declare_interior_mutable_const)]
    const EMPTY_PATH: AtomicPtr<c_char> = AtomicPtr::new(null_mut());

    static MAPS: [Map; SLOTS] = [EMPTY_MAP; SLOTS];
    /// Temporaries being written: files and folders.
    static TEMPORARIES: [AtomicPtr<c_char>; SLOTS] = [EMPTY_PATH; SLOTS];
    static INSTALLED: AtomicBool = AtomicBool::new(false);

    fn c_path(path: &Path) -> Option<*mut c_char> {
        use std::os::unix::ffi::OsStrExt;
        CString::new(path.as_os_str().as_bytes())
            .ok()
            .map(CString::into_raw)
    }

    /// Frees a pointer from [`c_path`].
    fn free(pointer: *mut c_char) {
        if !pointer.is_null() {
            // SAFETY: every non-null pointer in the tables comes from `CString::into_raw`, and
            // is swapped out of its slot before it is freed, once.
            drop(unsafe { CString::from_raw(pointer) });
        }
    }

    /// Registers a slot's value in the first free slot of `table`; `None` when full.
    fn claim(table: &[AtomicPtr<c_char>], value: *mut c_char) -> Option<usize> {
        (0..table.len()).find(|&i| {
            table[i]
                .compare_exchange(null_mut(), value, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    pub(crate) fn register_map(start: usize, len: usize, path: &Path) -> Option<usize> {
        let pointer = c_path(path)?;
        // A freed slot's length is 0, so that until its new range is stored it matches no
        // address.
        for (i, slot) in MAPS.iter().enumerate() {
            if slot
                .path
                .compare_exchange(null_mut(), pointer, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.start.store(start, Ordering::Release);
                slot.len.store(len, Ordering::Release);
                return Some(i);
            }
        }
        free(pointer);
        None
    }

    pub(crate) fn unregister_map(slot: usize) {
        MAPS[slot].len.store(0, Ordering::Release);
        free(MAPS[slot].path.swap(null_mut(), Ordering::AcqRel));
    }

    pub(crate) fn register_temporary(path: &Path) -> Option<usize> {
        let pointer = c_path(path)?;
        let slot = claim(&TEMPORARIES, pointer);
        if slot.is_none() {
            free(pointer);
        }
        slot
    }

    pub(crate) fn unregister_temporary(slot: usize) {
        free(TEMPORARIES[slot].swap(null_mut(), Ordering::AcqRel));
    }

    fn write_stderr(bytes: &[u8]) {
        // SAFETY: `write(2)` is async-signal-safe; the buffer outlives the call.
        unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
    }

    extern "C" fn on_bus_error(
        signal: libc::c_int,
        info: *mut libc::siginfo_t,
        _: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid `siginfo_t` to an `SA_SIGINFO` handler.
        let address = unsafe { (*info).si_addr() } as usize;
        let found = MAPS.iter().find_map(|slot| {
            let len = slot.len.load(Ordering::Acquire);
            let start = slot.start.load(Ordering::Acquire);
            let path = slot.path.load(Ordering::Acquire);
            (!path.is_null() && address >= start && address < start + len).then_some(path)
        });
        let Some(path) = found else {
            // Not a read of a mapped input: the default action, at once.
            // SAFETY: `signal` and `raise` are async-signal-safe.
            unsafe {
                libc::signal(signal, libc::SIG_DFL);
                libc::raise(signal);
            }
            return;
        };
        write_stderr(b"error: ");
        // SAFETY: a registered path is a valid C string until it is swapped out.
        write_stderr(unsafe { std::ffi::CStr::from_ptr(path) }.to_bytes());
        write_stderr(
            b": the file changed while it was read (a bus error on its memory map: truncated by \
              another process?); the partial output was removed\n",
        );
        for pass in 0..2 {
            for slot in &TEMPORARIES {
                let path = slot.load(Ordering::Acquire);
                if !path.is_null() {
                    // SAFETY: `unlink` and `rmdir` are async-signal-safe; files go first, then
                    // the folders they were in.
                    unsafe {
                        if pass == 0 {
                            libc::unlink(path);
                        } else {
                            libc::rmdir(path);
                        }
                    }
                }
            }
        }
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(1) };
    }

    pub(crate) fn handle_bus_errors() {
        if INSTALLED.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: a zeroed `sigaction` is a valid starting value; the handler only reads the
        // tables above and makes async-signal-safe calls.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_bus_error as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    }
}

#[cfg(target_os = "linux")]
use linux::*;

/// On Linux, installs the handler that turns a bus error on a memory-mapped input (a file
/// truncated by another process during a merge) into an error naming the file, with the
/// partial output removed and exit code 1; elsewhere nothing (see the module's notes). The
/// command line installs it first thing; a program that merges files may too.
pub fn handle_bus_errors() {
    #[cfg(target_os = "linux")]
    linux::handle_bus_errors();
}

/// A registration in the tables the bus-error handler reads, undone on drop.
pub(crate) struct Registered {
    #[cfg(target_os = "linux")]
    slot: Option<usize>,
    #[cfg(target_os = "linux")]
    map: bool,
}

impl Registered {
    /// A memory map of `path` at `start`, `len` bytes long.
    #[allow(unused_variables)]
    pub(crate) fn map(start: usize, len: usize, path: &std::path::Path) -> Self {
        Self {
            #[cfg(target_os = "linux")]
            slot: register_map(start, len, path),
            #[cfg(target_os = "linux")]
            map: true,
        }
    }

    /// A temporary file or folder being written.
    #[allow(unused_variables)]
    pub(crate) fn temporary(path: &std::path::Path) -> Self {
        Self {
            #[cfg(target_os = "linux")]
            slot: register_temporary(path),
            #[cfg(target_os = "linux")]
            map: false,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(slot) = self.slot {
            if self.map {
                unregister_map(slot);
            } else {
                unregister_temporary(slot);
            }
        }
    }
}
