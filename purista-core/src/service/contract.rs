//! Typed command contracts: one value that names a command and fixes its types, shared by the
//! service that serves it and every client that calls it.
//!
//! A [`CommandContract`] is a `const` in a crate both sides depend on. The server registers
//! its handler through it ([`CommandContract::handler`]), the client calls through it
//! ([`Context::call`](super::Context::call)), so a change to the input, parameter, output or
//! error type, or to the address, is a compile error on whichever side was not updated. A
//! string [`Address`] with a type chosen at the call site ([`Context::invoke`](super::Context::invoke))
//! stays for dynamic use.

use std::fmt;
use std::marker::PhantomData;

use crate::envelope::Address;

use super::handler::Empty;

/// The command's types as a function type: a contract is `Send`, `Sync` and `Copy` whatever
/// its types are, since it holds none of them.
type Signature<I, O, P, E> = fn(I, P) -> Result<O, E>;

/// The contract of one command: service, version and command name, and its input `I`, output
/// `O`, parameter `P` (default [`Empty`]) and error `E` (default `anyhow::Error`; a contract
/// with a [`BusinessError`](crate::BusinessError) type makes the handler return it).
///
/// ```
/// use purista_core::service::CommandContract;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// pub struct Add { pub a: i64, pub b: i64 }
///
/// /// `calculator@1/add`: two numbers in, their sum out.
/// pub const ADD: CommandContract<Add, i64> = CommandContract::new("calculator", "1", "add");
///
/// assert_eq!(ADD.address().to_string(), "calculator@1/add");
/// ```
///
/// A handler that drifts from the contract does not compile …
///
/// ```compile_fail
/// use purista_core::service::{CommandContract, Context};
/// const PEEK: CommandContract<String, u32> = CommandContract::new("stock", "1", "peek");
/// // The contract's input is a `String`, not a number.
/// let def = PEEK.handler(|_ctx: Context, sku: u64| async move { Ok(7u32) });
/// ```
///
/// … nor does a client expecting another output:
///
/// ```compile_fail
/// use purista_core::service::{CommandContract, Context};
/// const PEEK: CommandContract<String, u32> = CommandContract::new("stock", "1", "peek");
/// async fn client(ctx: Context) {
///     // The contract's output is a `u32`, not a `String`.
///     let left: String = ctx.call(&PEEK, "apple".to_string()).await.unwrap();
/// }
/// ```
pub struct CommandContract<I, O, P = Empty, E = anyhow::Error> {
    service: &'static str,
    version: &'static str,
    command: &'static str,
    types: PhantomData<Signature<I, O, P, E>>,
}

impl<I, O, P, E> CommandContract<I, O, P, E> {
    /// The contract of `service@version/command`.
    pub const fn new(service: &'static str, version: &'static str, command: &'static str) -> Self {
        CommandContract {
            service,
            version,
            command,
            types: PhantomData,
        }
    }

    /// The service name.
    pub const fn service(&self) -> &'static str {
        self.service
    }

    /// The service version.
    pub const fn version(&self) -> &'static str {
        self.version
    }

    /// The command name (`serviceTarget`).
    pub const fn command(&self) -> &'static str {
        self.command
    }

    /// The command's address.
    pub fn address(&self) -> Address {
        Address::new(self.service, self.version, self.command)
    }
}

impl<I, O, P, E> Clone for CommandContract<I, O, P, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<I, O, P, E> Copy for CommandContract<I, O, P, E> {}

impl<I, O, P, E> fmt::Debug for CommandContract<I, O, P, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CommandContract({}@{}/{})",
            self.service, self.version, self.command
        )
    }
}
