//! libtiff (under OpenSlide) prints its own errors and warnings to stderr, e.g. "TIFFReadRawTile: Read
//! error at row 4294967295 …" ahead of histolens's message about the same file. Its handlers are
//! replaced, once, by ones that send the text to the log (`RUST_LOG=info` shows them): histolens
//! reports the failure itself, naming the file.
//!
//! libtiff is not linked by histolens but loaded with OpenSlide, so its handler setters are looked up
//! at run time; without them nothing changes.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Once;

/// libtiff's `TIFFErrorHandler`: (module, printf format, va_list). A `va_list` reaches a function as a
/// pointer on x86-64 and AArch64 Linux (an array type, or a large struct passed by reference).
type Handler = unsafe extern "C" fn(*const c_char, *const c_char, *mut c_void);
type SetHandler = unsafe extern "C" fn(Option<Handler>) -> Option<Handler>;

unsafe extern "C" {
    fn vsnprintf(buf: *mut c_char, size: usize, format: *const c_char, ap: *mut c_void) -> c_int;
}

/// Replaces libtiff's stderr handlers by the log's (idempotent).
pub fn route_to_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if !cfg!(all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        )) {
            return;
        }
        for (setter, handler) in [
            (c"TIFFSetErrorHandler", on_error as Handler),
            (c"TIFFSetWarningHandler", on_warning as Handler),
        ] {
            // SAFETY: dlsym with RTLD_DEFAULT searches the libraries already loaded; the symbol,
            // when found, is libtiff's setter with the signature above.
            unsafe {
                let f = libc::dlsym(libc::RTLD_DEFAULT, setter.as_ptr());
                if !f.is_null() {
                    let set: SetHandler = std::mem::transmute::<*mut c_void, SetHandler>(f);
                    set(Some(handler));
                }
            }
        }
    });
}

/// The message libtiff formats, as text.
///
/// # Safety
/// `module` is null or a C string, `format` a C string and `ap` the arguments it describes.
unsafe fn message(module: *const c_char, format: *const c_char, ap: *mut c_void) -> String {
    let mut buf = [0 as c_char; 1024];
    // SAFETY: vsnprintf writes at most buf.len() bytes, NUL included, per the caller's contract.
    let text = unsafe {
        if vsnprintf(buf.as_mut_ptr(), buf.len(), format, ap) < 0 {
            CStr::from_ptr(format)
        } else {
            CStr::from_ptr(buf.as_ptr())
        }
    };
    let text = text.to_string_lossy();
    if module.is_null() {
        text.into_owned()
    } else {
        // SAFETY: non-null module names are C strings.
        format!(
            "{}: {text}",
            unsafe { CStr::from_ptr(module) }.to_string_lossy()
        )
    }
}

unsafe extern "C" fn on_error(module: *const c_char, format: *const c_char, ap: *mut c_void) {
    // SAFETY: called by libtiff with its own arguments.
    log::info!(target: "libtiff", "{}", unsafe { message(module, format, ap) });
}

unsafe extern "C" fn on_warning(module: *const c_char, format: *const c_char, ap: *mut c_void) {
    // SAFETY: as for errors.
    log::debug!(target: "libtiff", "{}", unsafe { message(module, format, ap) });
}
