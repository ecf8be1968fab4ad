//! Request, completion and message ids: a completion id names its request and choice, so
//! feedback posted against it finds the request's usage record without a lookup table.

/// A new request id: a time-ordered UUID (v7) whose last byte is zero, as 32 hex digits. The
/// last byte is where [`completion_id`] writes the choice index.
pub fn new_request_id() -> String {
    let mut bytes = uuid::Uuid::now_v7().into_bytes();
    bytes[15] = 0;
    uuid::Uuid::from_bytes(bytes).simple().to_string()
}

/// The id of choice `index` of a request: the request's UUID with the index in its last byte,
/// written hyphenated (`3c90c3cc-0d44-7b50-8888-8dd257360500`).
pub fn completion_id(request_id: &str, index: u32) -> String {
    match uuid::Uuid::parse_str(request_id) {
        Ok(u) => {
            let mut bytes = u.into_bytes();
            bytes[15] = u8::try_from(index).unwrap_or(u8::MAX);
            uuid::Uuid::from_bytes(bytes).hyphenated().to_string()
        }
        Err(_) => format!("{request_id}-{index}"),
    }
}

/// The request a completion id belongs to, and its choice.
pub fn request_of(completion_id: &str) -> Option<(String, u32)> {
    let u = uuid::Uuid::parse_str(completion_id).ok()?;
    let mut bytes = u.into_bytes();
    let index = u32::from(bytes[15]);
    bytes[15] = 0;
    Some((uuid::Uuid::from_bytes(bytes).simple().to_string(), index))
}

/// The id of the assistant message of choice `index` (`msg_` + the completion's hex).
pub fn message_id(request_id: &str, index: u32) -> String {
    format!("msg_{}", completion_id(request_id, index).replace('-', ""))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn completion_ids_name_their_request_and_choice() {
        let r = new_request_id();
        assert_eq!(r.len(), 32);
        assert!(r.ends_with("00"));
        let c3 = completion_id(&r, 3);
        assert_ne!(c3, completion_id(&r, 4));
        assert_eq!(request_of(&c3), Some((r.clone(), 3)));
        assert_eq!(request_of(&completion_id(&r, 0)), Some((r.clone(), 0)));
        assert!(message_id(&r, 1).starts_with("msg_"));
        assert_eq!(request_of("not-a-uuid"), None);
        assert_ne!(new_request_id(), new_request_id());
    }
}
